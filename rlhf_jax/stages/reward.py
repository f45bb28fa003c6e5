"""Stage 2: preference collection with the simulated labeller, and the K-wise reward model.

With ``data`` other than ``"simulated"`` the stage trains on human preference files instead, from
an imported checkpoint (:mod:`rlhf_jax.stages.reward_files`).

The reward model is the policy's trunk with a scalar head read at the last response token,
initialised from the SFT model (InstructGPT §3.5), trained with the K-wise Bradley–Terry loss; it
scores responses through one function (:mod:`rlhf_jax.stages.reward_model`).
Evaluation is on held-out prompts' SFT samples, against the noisy labels and against the gold
judge's noise-free ordering.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path
from typing import Literal

import jax
import numpy as np

from rlhf_jax.configs import check, check_numbers, positive
from rlhf_jax.data.batching import encode_groups
from rlhf_jax.data.preference_records import decode_record
from rlhf_jax.data.preferences import build_preference_dataset, load_preference_source
from rlhf_jax.data.task import Task
from rlhf_jax.evaluate import pairwise_gold_agreement, score_groups
from rlhf_jax.labeler import LabelerConfig, Preferences, noise_ceiling
from rlhf_jax.models import create_model
from rlhf_jax.models.functional import transplant
from rlhf_jax.runs import RunDir
from rlhf_jax.stages.common import (STREAM_INIT, epoch_order, load_stage, read_config, stage_key,
                                    train_stage)
from rlhf_jax.stages.file_checks import (check_export_dir, check_export_run_dir,
                                         check_file_inputs, check_no_file_fields)
from rlhf_jax.stages.lm import SFTConfig
from rlhf_jax.stages.reward_model import (READOUTS, frozen_trunk, init_lm_coef, kwise_rm_loss_fn,
                                          rm_heads, rm_score_fn, with_frozen)
from rlhf_jax.tasks import TaskConfig
from rlhf_jax.train import OptimConfig


DataSource = Literal["simulated", "hh-rlhf", "summarize"]
Readout = Literal["last", "sum", "mean"]   # reward_model.READOUTS


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward modelling on simulated preferences, or on human preference files.

    Attributes:
      seed: seeds labelling noise, head initialisation and batch order.
      data: ``simulated`` (the task's SFT samples ranked by the simulated labeller), or human
        pairwise preferences from files: ``hh-rlhf`` (Anthropic HH-RLHF) or ``summarize`` (OpenAI
        summarize-from-feedback comparisons). File data needs ``--init-from CKPT``
        (``sft.pretrain.init_from``, a checkpoint with a ``tokenizer.json``): the RM starts from
        that checkpoint directly, with no task pretraining or SFT.
      data_dir: with file data, the directory holding ``train.jsonl`` (or ``train.jsonl.gz``)
        and ``test.jsonl`` (or ``test.jsonl.gz``) in the upstream format.
      max_prompt_tokens: with file data, the prompt budget in tokens (BOS included); longer
        prompts keep their last tokens (counted in the summary).
      max_response_tokens: with file data, the response budget in tokens (EOS included); longer
        responses keep their first tokens, then EOS (counted in the summary).
      export_hf: with file data, also write the trained RM to this directory as a Hugging Face
        sequence classifier, its normalisation folded in (needs ``--no-lm-readout``); a new or
        empty directory, or this run's earlier export (not the checkpoint, nor in or around the
        run directory).
      sft_dir: a finished SFT run to start from; empty = run ``sft`` first into ``<out>/sft``.
      sft: the SFT config used when ``sft_dir`` is empty.
      preferences_dir: a TFDS preference data set built by an earlier reward run (its
        ``<out>/data``) to train on instead of labelling afresh.
      labeler: responses per prompt (K) and the labeller's noise temperature τ.
      margin: Bradley–Terry margin (0 = plain BT).
      batch_prompts: prompts per step (each with its K responses).
      steps: optimizer steps.
      optim: AdamW / schedule / clipping.
      normalize: fit gain and bias so rewards of SFT samples have mean 0, std 1 (Ziegler et al.).
      log_every: log metrics every this many steps.
      checkpoint_every: resumable checkpoint interval (0 = only at the end).
      lm_readout: add the LM-likelihood readout: reward = head(h_last) + c · log p(response), with
        log p the trunk's own LM log-likelihood of the response and c a second head (``LM_COEF``)
        read at the last token (see ``stages.reward_model.make_score_fn``).
      lm_coef_init: the coefficient's initial value (its head starts with a zero kernel).
      lm_stop_grad: the likelihood term does not train the trunk, only the coefficient.
      lm_coef_gated: let the coefficient depend on the last hidden state (its head's kernel
        learns); otherwise c is one learned scalar (its kernel stays zero), which cannot turn
        negative on unusual responses.
      freeze_trunk: train only the scalar heads; the trunk keeps the SFT weights (weight decay
        too applies to the heads only).
      readout: where the reward head is read: ``last`` (the last response token, InstructGPT),
        ``sum`` or ``mean`` (a per-token value summed / averaged over the response tokens under
        their mask; not with ``lm_readout``).
      train_prompts: train on only the first this many labelled training prompts (0 = all), e.g.
        a weaker RM from a share of an earlier run's comparisons (``preferences_dir``).
      fsdp: split parameters and optimizer state over the devices (FSDP) instead of replicating.
    """

    seed: int = 0
    data: DataSource = "simulated"
    data_dir: str = ""
    max_prompt_tokens: int = 256
    max_response_tokens: int = 128
    export_hf: str = ""
    sft_dir: str = ""
    sft: SFTConfig = SFTConfig()
    preferences_dir: str = ""
    labeler: LabelerConfig = LabelerConfig()
    margin: float = 0.0
    batch_prompts: int = 16
    steps: int = 400
    optim: OptimConfig = OptimConfig(learning_rate=5e-4, warmup_steps=20, weight_decay=0.0)
    normalize: bool = True
    log_every: int = 50
    checkpoint_every: int = 0
    lm_readout: bool = True
    lm_coef_init: float = 1.0
    lm_stop_grad: bool = False
    lm_coef_gated: bool = False
    freeze_trunk: bool = True
    readout: Readout = "last"
    train_prompts: int = 0
    fsdp: bool = False

    def __post_init__(self):
        check_numbers(self)
        positive(self, "batch_prompts", "steps", "log_every")
        for name in ("max_prompt_tokens", "max_response_tokens"):   # room for BOS / EOS + a token
            check(getattr(self, name) >= 2, name, f"must be >= 2, got {getattr(self, name)}")
        check(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        check(self.train_prompts >= 0, "train_prompts", "must be >= 0 (0 = all)")
        check(self.readout in READOUTS, "readout", f"must be one of {READOUTS}, got "
              f"{self.readout!r}")
        check(self.readout == "last" or not self.lm_readout, "readout",
              f"{self.readout!r} pools a per-token head; the LM-likelihood readout adds to a "
              "last-token head: add --no-lm-readout")
        check(self.optim.warmup_steps <= self.steps, "optim.warmup_steps",
              f"{self.optim.warmup_steps} exceeds steps={self.steps}")
        check(self.sft.data == "task", "sft.data", "the reward stage's SFT run learns the "
              "task's demonstrations; on preference files give --init-from an SFT export")
        if self.data == "simulated":
            check_no_file_fields(self)
        else:
            self._check_file_data()

    def _check_file_data(self):
        """File data: a checkpoint with a tokenizer, both split files, budgets in its context."""
        init_from = self.sft.pretrain.init_from
        check_file_inputs(self, init_from, "sft.pretrain.init_from",
                          "trains the RM from an imported checkpoint")
        for name in ("sft_dir", "preferences_dir"):
            check(not getattr(self, name), name, f"unused with --data {self.data}")
        if self.export_hf:
            check_export_dir(self.export_hf, init_from)

    def check_run_dir(self, out: str | Path) -> None:
        """The reward model's export, before any work (``run_files`` calls this): a readout a
        Hugging Face classifier holds, and ``export_hf`` against the run directory ``out``
        (:func:`check_export_run_dir`). Checked here, not while parsing, so that a stage that
        only nests this config (DPO on files) refuses ``--reward.export-hf`` with its own
        advice first."""
        check(not (self.export_hf and self.lm_readout), "export_hf",
              "no Hugging Face head holds the LM-likelihood readout: add --no-lm-readout")
        check(not (self.export_hf and self.readout != "last"), "export_hf",
              "a Hugging Face sequence classifier reads the last token: use --readout last")
        check_export_run_dir(self.export_hf, out)


def check_task_reward(reward_cfg: RewardConfig, field: str) -> None:
    """A stage that goes on from a reward run on the task (PPO, DPO) needs simulated preferences:
    an RM trained on preference files has no task policy (SFT) to start from."""
    check(reward_cfg.data == "simulated", field,
          f"the reward model was trained on --data {reward_cfg.data}, with no task policy (SFT) "
          "to start from; this stage needs a reward run on simulated preferences")


# The stored preferences' version: 1.0.0 texts only; 1.1.0 each response's sampled ids
# (response_ids) beside its text. A data set of 1.0.0 is still read (the latest version in a
# directory is); a rerun on a directory holding one builds 1.1.0 beside it.
VERSION = "1.1.0"


def dataset_name(task: Task) -> str:
    """The TFDS name of a task's stored preferences."""
    return f"{task.name}_preferences"


def load_reward_model(reward_dir: str | Path, prompt_len: int):
    """``(reward config, score function, RM parameters)`` of a finished reward run."""
    reward_cfg = read_config(reward_dir, RewardConfig)
    _, rm, rm_params = load_stage(reward_dir, RewardConfig, heads=rm_heads(reward_cfg.lm_readout),
                                  config_of=lambda c: c.sft.pretrain)
    return reward_cfg, rm_score_fn(reward_cfg, rm, prompt_len), rm_params


def first_prompts(prefs: Preferences, n: int) -> Preferences:
    """The comparisons of ``prefs``' first ``n`` prompts (all of them when ``n`` is 0)."""
    if not n:
        return prefs
    return Preferences(prefs.prompts[:n], prefs.responses[:n], prefs.ranking[:n], prefs.gold[:n],
                       prefs.kinds[:n], prefs.response_ids and prefs.response_ids[:n])


def preference_arrays(tok, prefs: Preferences, shapes: TaskConfig, *, max_len: int
                      ) -> dict[str, np.ndarray]:
    """Token arrays of K-wise preferences: prompts ``[N, Lp]``, responses ``[N, K, Lr]``, and
    the ``ranking [N, K]``.

    A response is its stored sampled ids (``prefs.response_ids``) when ``tok`` decodes them to
    its text, else its text encoded (:func:`rlhf_jax.data.batching.response_tokens`): the same
    tokens in any process, whether or not this one sampled them. ``Lr`` is the sampling budget
    plus EOS, or more when an encoded text has more ids than were sampled: a BPE's canonical
    segmentation of a sampled text can be longer than the ids the policy drew (a data set stored
    without ids, or by another tokenizer). ``max_len``, the model's context, bounds ``Lp + Lr``:
    an error names the longest response rather than letting positions run past the model's
    table."""
    arrays = encode_groups(tok, prefs.prompts, prefs.responses, prompt_len=shapes.prompt_len,
                           response_len=shapes.max_new_tokens + 1, widen=True,
                           ids=prefs.response_ids)
    width = arrays["responses"].shape[-1]
    if shapes.prompt_len + width > max_len:
        raise ValueError(f"a stored response encodes to {width - 1} tokens: with the prompt's "
                         f"{shapes.prompt_len} and EOS that exceeds the model's context of "
                         f"{max_len} positions")
    return {**arrays, "ranking": prefs.ranking.astype(np.float32)}


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    def ranks(a):
        order = np.argsort(a, kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for v in np.unique(a):  # average ranks of ties
            sel = a == v
            r[sel] = r[sel].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def rm_metrics(rewards: np.ndarray, prefs: Preferences, tau: float, *,
               kinds: tuple[str, ...] = (), min_pairs: int = 30) -> dict[str, float]:
    """Held-out RM metrics (the ``rm/…`` keys of the reward summary); agreement with the judge
    per pair of response ``kinds`` (the task's) with at least ``min_pairs`` pairs."""
    k = rewards.shape[1]
    i, j = np.triu_indices(k, 1)
    dr = rewards[:, i] - rewards[:, j]
    dg = prefs.gold[:, i] - prefs.gold[:, j]
    dl = prefs.ranking[:, i] - prefs.ranking[:, j]
    differ = dg != 0
    out = {
        "rm/accuracy": float(np.mean((np.sign(dr) == np.sign(dl))[differ & (dl != 0)])),
        "rm/accuracy_all_pairs": float(np.mean((np.sign(dr) == np.sign(dl))[dl != 0])),
        "rm/noise_ceiling": noise_ceiling(prefs.gold, tau),
        # the gold ordering's own accuracy on exactly the pairs rm/accuracy counts: the ceiling as
        # realised, after identical responses were tied (ties drop out of both)
        "rm/gold_label_accuracy": float(np.mean((np.sign(dg) == np.sign(dl))[differ & (dl != 0)])),
        "rm/gold_agreement": pairwise_gold_agreement(rewards, prefs.gold),
        "rm/gold_pairs": int(differ.sum()),
        "rm/spearman": _spearman(rewards.ravel(), prefs.gold.ravel()),
        "rm/reward_mean": float(rewards.mean()), "rm/reward_std": float(rewards.std()),
    }
    of = np.asarray(prefs.kinds)
    ki, kj = of[:, i], of[:, j]
    agree = np.sign(dr) == np.sign(dg)
    for a, b in itertools.combinations_with_replacement(kinds, 2):
        sel = differ & (((ki == a) & (kj == b)) | ((ki == b) & (kj == a)))
        if sel.sum() >= min_pairs:
            out[f"rm/gold_agreement/{a}_vs_{b}"] = float(agree[sel].mean())
            out[f"rm/pairs/{a}_vs_{b}"] = int(sel.sum())
    return out


def store_and_reload(prefs: dict[str, Preferences], data_dir: Path, task: Task,
                     name: str | None = None, version: str = VERSION) -> dict[str, Preferences]:
    """Write the labelled splits as a versioned TFDS data set (``array_record``; ``name`` default
    the task's preferences) and read them back through ``tfds.data_source``, so training sees
    exactly what is stored."""
    name = name or dataset_name(task)
    build_preference_dataset({k: v.records() for k, v in prefs.items()}, data_dir, name=name,
                             version=version)
    return {split: read_preferences(data_dir, split, task, name) for split in prefs}


def read_preferences(data_dir: Path, split: str, task: Task, name: str | None = None
                     ) -> Preferences:
    """A stored split (of data set ``name``, default the task's preferences), re-joined with the
    task's prompts (for the judge's evaluation-only kinds)."""
    by_uid = {p.uid: p for s in ("train", "heldout") for p in task.prompts(s)}
    records = [decode_record(r) for r in load_preference_source(
        data_dir, name or dataset_name(task), split)]
    prompts = []
    for r in records:
        if r["id"] not in by_uid:
            raise ValueError(f"{data_dir}: split {split!r}: record id {r['id']!r} is not a prompt "
                             f"of task {task.name!r} (a different task or task config?)")
        prompts.append(by_uid[r["id"]])
    responses = [list(r["responses"]) for r in records]
    kinds = [[task.kind(task.judge(p, t)) for t in row] for p, row in zip(prompts, responses)]
    ids = [r["response_ids"] for r in records]
    return Preferences(prompts, responses, np.asarray([r["ranking"] for r in records], np.float32),
                       np.asarray([r["gold"] for r in records], np.float32), kinds,
                       None if all(i is None for i in ids) else ids)


def fit_reward_model(cfg: RewardConfig, model_cfg, trunk_params, data: dict[str, np.ndarray], *,
                     prompt_len: int, run: RunDir):
    """The RM of architecture ``model_cfg`` started from ``trunk_params`` (an LM's), trained on
    K-wise arrays ``data`` (``preference_arrays`` layout) with ``train_stage``, and its
    normalisation (written to ``reward_norm.json``): ``(Model, params, jitted score,
    (gain, bias))``."""
    rm, rm_params = create_model(model_cfg, stage_key(cfg.seed, STREAM_INIT),
                                 heads=rm_heads(cfg.lm_readout))
    rm_params = transplant(trunk_params, rm_params)
    if cfg.lm_readout:
        rm_params = init_lm_coef(rm_params, cfg.lm_coef_init)
    score = rm_score_fn(cfg, rm, prompt_len)
    order = epoch_order(len(data["prompts"]), cfg.batch_prompts, cfg.seed,
                        "batch_prompts")
    loss_fn = functools.partial(kwise_rm_loss_fn, score=score, margin=cfg.margin)
    if cfg.freeze_trunk or (cfg.lm_readout and not cfg.lm_coef_gated):
        loss_fn = with_frozen(loss_fn, trunk=cfg.freeze_trunk,
                              coef_kernel=cfg.lm_readout and not cfg.lm_coef_gated)
    rm_params = train_stage(rm_params, loss_fn, lambda s: order.batch(data, s), seed=cfg.seed,
                            steps=cfg.steps, optim=cfg.optim, run=run, prefix="rm",
                            log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                            fsdp=cfg.fsdp, frozen=frozen_trunk if cfg.freeze_trunk else None)
    score_jit = jax.jit(score)
    gain, bias = 1.0, 0.0
    if cfg.normalize:
        train_rewards = score_groups(score_jit, rm_params, data)
        gain = float(1.0 / max(train_rewards.std(), 1e-6))
        bias = float(-train_rewards.mean() * gain)
    run.write_json("reward_norm.json", {"gain": gain, "bias": bias})
    return rm, rm_params, score_jit, (gain, bias)
