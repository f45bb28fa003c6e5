"""Offline preference optimisation (DPO, IPO, SimPO) on the reward run's labelled comparisons.

The policy and the reference both start from the SFT model the reward run started from, and
train on exactly the K-wise comparisons that reward model was trained on (the reward run's stored
TFDS ``train`` split): every prompt's K responses are forwarded once (the prompt once for all K),
and all C(K, 2) untied pairs enter the loss (``rlhf_jax.losses.preference``). This module holds
the config, the forward pass (``response_logps``), the precomputed reference and the ``loss_fn``;
``experiments/dpo.py`` composes them with ``stages.common.train_stage`` (data parallel,
checkpoints, resume, non-finite handling) and the pinned held-out evaluation of
:mod:`rlhf_jax.evaluate`: SFT and the policy on the held-out prompts, paired by prompt and sample
index under the gold judge, and the exact per-sequence KL(π ‖ π_SFT) on the policy's samples.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.configs import check, check_numbers, non_negative, positive
from rlhf_jax.data.batching import pad_rows
from rlhf_jax.data.binary_feedback import DEFAULT_FLIP
from rlhf_jax.losses.preference import (PREFERENCE_LOSSES, REFERENCE_FREE, hparam_problems,
                                        kto_loss, kwise_preference_loss)
from rlhf_jax.models.functional import Model
from rlhf_jax.ops import sequence_logprob
from rlhf_jax.runs import config_differences
from rlhf_jax.sampling import response_logits
from rlhf_jax.shared_prompt import shared_prompt_logps
from rlhf_jax.stages.file_checks import check_causal_lm, check_export_dir
from rlhf_jax.stages.reward import RewardConfig, preference_arrays
from rlhf_jax.train import OptimConfig

REFERENCES = ("precomputed", "recompute")
STARTS_FROM_BASE = frozenset({"orpo"})   # losses that replace SFT: trained from the base model
# the reward config's fields a run on preference files reads (the others train a reward model)
FILE_FIELDS = ("data", "data_dir", "max_prompt_tokens", "max_response_tokens",
               "sft.pretrain.init_from", "export_hf")


@dataclasses.dataclass(frozen=True)
class OfflineConfig:
    """Offline preference optimisation from SFT on the RM's labelled comparisons.

    Attributes:
      seed: seeds the batch order (and the train-key stream).
      reward_dir: a finished reward run whose comparisons (and SFT model) to use; empty = run
        ``reward`` first into ``<out>/reward``.
      reward: the reward config used when ``reward_dir`` is empty.
      loss: ``dpo``, ``ipo``, ``simpo``, ``orpo`` (pairs of the K-wise comparisons) or ``kto``
        (one noisy binary label per response, :mod:`rlhf_jax.data.binary_feedback`); see
        ``rlhf_jax.losses.preference``. ORPO replaces SFT: it starts from the pretrained model
        (the SFT run's base), and is evaluated paired with SFT like the others.
      beta: DPO's and KTO's β (KL strength: the implicit reward is β·log π/π_ref). On the embedded task
        β = 0.3 has the highest held-out gold of 0.1 / 0.2 / 0.3 / 0.5 (README's DPO β table,
        ``results/dpo_beta/``); β = 0.1 drifts furthest and answers most often malformed.
      label_smoothing: conservative DPO's label-flip probability ε (0 = plain DPO).
      ipo_tau: IPO's τ (target log-ratio margin 1/(2τ)).
      ipo_average_length: IPO on per-token (length-averaged) log-ratios.
      simpo_beta: SimPO's β (scale of the length-normalised log-likelihood reward).
      simpo_margin: SimPO's target reward margin γ.
      orpo_lambda: ORPO's λ (weight of the odds-ratio term beside the chosen response's NLL).
      kto_lambda_desirable, kto_lambda_undesirable: KTO's λ_D and λ_U.
      kto_label_flip: probability that a binary label is flipped (the labeller's noise).
      loss_args: keyword hyperparameters passed to the loss on top of the ones above (e.g. for a
        loss you registered in ``PREFERENCE_LOSSES``: ``--loss-args delta 1.0``).
      reference: ``precomputed`` (reference log-probs of every response computed once before
        training) or ``recompute`` (the frozen reference forwarded in every step).
      batch_prompts: prompts per step (each with its K responses).
      steps: optimizer steps.
      optim: AdamW / schedule / clipping.
      eval_every: every this many steps evaluate on the held-out prompts and log
        ``heldout/<metric>`` for the task's headline metrics and ``heldout/kl`` (0 = only the
        final evaluation).
      log_every: log training metrics every this many steps.
      checkpoint_every: resumable checkpoint interval (0 = only at the end).
      fsdp: split parameters and optimizer state over the devices instead of replicating.
      export_hf: with preference files (``--reward.data hh-rlhf`` or ``summarize``), also write
        the trained policy to this directory as a Hugging Face causal LM (config, safetensors
        and tokenizer files).

    On preference files (``--reward.data``, ``--reward.data-dir``, ``--init-from CKPT``, the
    token budgets ``--reward.max-prompt-tokens`` / ``--reward.max-response-tokens``) the policy
    and the reference both start from the checkpoint and train on the files' train split; the
    test split is scored at the end (the log-ratio log π/π_ref of chosen vs rejected).
    """

    seed: int = 0
    reward_dir: str = ""
    reward: RewardConfig = RewardConfig()
    loss: str = "dpo"
    beta: float = 0.3
    label_smoothing: float = 0.0
    ipo_tau: float = 0.1
    ipo_average_length: bool = False
    simpo_beta: float = 2.0
    simpo_margin: float = 1.0
    orpo_lambda: float = 0.1
    kto_lambda_desirable: float = 1.0
    kto_lambda_undesirable: float = 1.0
    kto_label_flip: float = DEFAULT_FLIP
    loss_args: dict[str, float] = dataclasses.field(default_factory=dict)
    reference: str = "precomputed"
    batch_prompts: int = 16
    steps: int = 400
    optim: OptimConfig = OptimConfig(learning_rate=5e-5, warmup_steps=20, weight_decay=0.0)
    eval_every: int = 0
    log_every: int = 50
    checkpoint_every: int = 100
    fsdp: bool = False
    export_hf: str = ""

    def __post_init__(self):
        check_numbers(self)
        if self.reward.data == "simulated":
            check(not self.export_hf, "export_hf", "only used with preference files "
                  "(--reward.data hh-rlhf or summarize)")
        else:
            self._check_file_data()
        check(self.loss in PREFERENCE_LOSSES or self.loss == "kto", "loss",
              f"must be one of {sorted(PREFERENCE_LOSSES) + ['kto']}, got {self.loss!r}")
        for k, v in self.loss_args.items():
            check(isinstance(v, (int, float)) and math.isfinite(v), f"loss_args.{k}",
                  f"must be a finite number, got {v!r}")
        if self.loss in PREFERENCE_LOSSES:   # before any stage runs, not at the first step
            for k, problem in hparam_problems(self.loss, self.loss_hparams()).items():
                check(False, f"loss_args.{k}", problem)
        else:   # KTO: the keywords kto_loss takes (the stage passes the masks)
            takes = sorted(k for k, p in inspect.signature(kto_loss).parameters.items()
                           if p.kind is p.KEYWORD_ONLY and k not in ("mask", "kl_mask",
                                                                     "axis_name"))
            for k in self.loss_args:
                check(k in takes, f"loss_args.{k}",
                      f"loss 'kto' takes no argument {k!r} (it takes {takes})")
        check(self.reference in REFERENCES, "reference",
              f"must be one of {REFERENCES}, got {self.reference!r}")
        positive(self, "beta", "ipo_tau", "simpo_beta", "orpo_lambda", "kto_lambda_desirable",
                 "kto_lambda_undesirable", "batch_prompts", "steps", "log_every")
        check(0.0 <= self.kto_label_flip < 0.5, "kto_label_flip",
              f"must be in [0, 0.5), got {self.kto_label_flip}")
        non_negative(self, "simpo_margin", "eval_every", "checkpoint_every")
        check(0.0 <= self.label_smoothing < 0.5, "label_smoothing",
              f"must be in [0, 0.5), got {self.label_smoothing}")
        check(self.optim.warmup_steps <= self.steps, "optim.warmup_steps",
              f"{self.optim.warmup_steps} exceeds steps={self.steps}")

    def _check_file_data(self) -> None:
        """On preference files (``reward.data``; the files, the checkpoint and the token budgets
        are the reward config's, checked there) the policy and the reference are the
        checkpoint, and the test split is scored at the end."""
        use = f"with --reward.data {self.reward.data}"
        check(not self.reward_dir, "reward_dir", f"unused {use}: the policy trains on the files")
        check(self.loss != "kto", "loss", f"KTO's binary labels come from the task's labeller; "
              f"{use} choose one of {sorted(PREFERENCE_LOSSES)}")
        check(self.eval_every == 0, "eval_every", f"the held-out evaluation needs a task; {use} "
              "the test split is scored at the end")
        check(not self.reward.export_hf, "reward.export_hf", f"{use} no reward model is trained; "
              "--export-hf exports the policy")
        changed = [k for k in config_differences(dataclasses.asdict(RewardConfig()), self.reward)
                   if k not in FILE_FIELDS]
        check(not changed, f"reward.{changed[0]}" if changed else "reward",
              f"unused {use}: no reward model is trained (the policy trains with --steps, "
              "--batch-prompts, --optim.*, --seed)")
        check_causal_lm(self.reward.sft.pretrain.init_from, "reward.sft.pretrain.init_from",
                        f"--reward.data {self.reward.data} trains")
        if self.export_hf:
            check_export_dir(self.export_hf, self.reward.sft.pretrain.init_from)

    def loss_hparams(self) -> dict[str, float | bool]:
        """Keyword hyperparameters of the chosen loss."""
        builtin = {"dpo": {"beta": self.beta, "label_smoothing": self.label_smoothing},
                   "ipo": {"tau": self.ipo_tau, "average_length": self.ipo_average_length},
                   "simpo": {"beta": self.simpo_beta, "simpo_margin": self.simpo_margin},
                   "orpo": {"orpo_lambda": self.orpo_lambda},
                   "kto": {"beta": self.beta, "lambda_desirable": self.kto_lambda_desirable,
                           "lambda_undesirable": self.kto_lambda_undesirable}}
        return {**builtin.get(self.loss, {}), **self.loss_args}


def offline_arrays(tok, prefs, shapes, *, max_len: int) -> dict[str, np.ndarray]:
    """The task's K-wise comparisons as the policy trains on them: :func:`preference_arrays`
    (the reward model's layout, which appends EOS to every response so that the RM reads its score
    at one) with the mask cut to the sampling budget ``shapes.max_new_tokens``, so that a response
    the sampler cut at the budget counts only the tokens it drew (no EOS, as
    :func:`rlhf_jax.evaluate.sequence_kl` counts it and as the preference files' DPO tokenizes
    a cut response), and ``lengths [N, K]`` (response tokens counted)."""
    data = preference_arrays(tok, prefs, shapes, max_len=max_len)
    data["response_mask"] = data["response_mask"].copy()
    data["response_mask"][..., shapes.max_new_tokens:] = 0
    data["lengths"] = data["response_mask"].sum(-1).astype(np.float32)
    return data


def response_logps(model: Model, params, prompts, prompt_mask, responses, response_mask
                   ) -> jax.Array:
    """Summed log-probs of K responses per prompt, each forwarded once and the prompt once per
    prompt (:mod:`rlhf_jax.shared_prompt`): ``prompts [P, Lp]`` (left-padded), ``responses
    [P, K, Lr]`` (right-padded, EOS included) -> ``[P, K]``."""
    if responses.shape[1] > 1:
        return shared_prompt_logps(model, params, prompts, prompt_mask, responses, response_mask)
    logits, _ = response_logits(model, params, prompts, prompt_mask, responses[:, 0],
                                response_mask[:, 0])
    return sequence_logprob(logits, responses[:, 0], response_mask[:, 0])[:, None]


_response_logps_jit = jax.jit(response_logps, static_argnames=("model",))


def precompute_logps(model: Model, params, data: dict[str, np.ndarray], batch: int = 64
                     ) -> np.ndarray:
    """:func:`response_logps` of every prompt of ``data``, ``[N, K]`` (fixed-size batches)."""
    n = len(data["prompts"])
    out = []
    for s in range(0, n, batch):
        sl = slice(s, s + batch)
        rows = len(data["prompts"][sl])
        arrays = [jnp.asarray(pad_rows(data[f][sl], batch))
                  for f in ("prompts", "prompt_mask", "responses", "response_mask")]
        out.append(np.asarray(_response_logps_jit(model, params, *arrays))[:rows])
    return np.concatenate(out).astype(np.float32)


def offline_loss_fn(params, batch: dict[str, jax.Array], key: jax.Array | None = None, *,
                    model: Model, loss: str, hparams: dict, ref_params=None, axis_name=None):
    """Forward the policy on every response once, then ``kwise_preference_loss``.

    ``batch``: ``prompts [P, Lp]``, ``prompt_mask``, ``responses [P, K, Lr]``, ``response_mask``,
    ``ranking [P, K]``, ``lengths [P, K]`` and, unless ``ref_params`` is given (the reference
    recomputed here) or the loss is reference-free, ``ref_logps [P, K]``.
    """
    del key
    args = (batch["prompts"], batch["prompt_mask"], batch["responses"], batch["response_mask"])
    logps = response_logps(model, params, *args)
    ref = None
    if loss not in REFERENCE_FREE:
        ref = (batch["ref_logps"] if ref_params is None else
               jax.lax.stop_gradient(response_logps(model, ref_params, *args)))
    value, metrics = kwise_preference_loss(loss, logps, ref, batch["lengths"], batch["ranking"],
                                           axis_name=axis_name, **hparams)
    return value, {"loss": value, **metrics}


def kto_loss_fn(params, batch: dict[str, jax.Array], key: jax.Array | None = None, *,
                model: Model, hparams: dict, ref_params=None, axis_name=None):
    """Forward the policy on every labelled response and (without gradient) on the mismatched
    pairs, then ``kto_loss``.

    ``batch``: ``prompts [P, Lp]``, ``prompt_mask``, ``responses [P, K, Lr]``, ``response_mask``,
    ``ranking [P, K]`` (the binary labels), ``kl_responses`` / ``kl_response_mask`` (the next
    prompt's responses) and, unless ``ref_params`` is given, ``ref_logps`` / ``ref_kl_logps``.
    """
    del key
    prompts, prompt_mask = batch["prompts"], batch["prompt_mask"]
    logps = response_logps(model, params, prompts, prompt_mask, batch["responses"],
                           batch["response_mask"])
    kl_logps = jax.lax.stop_gradient(response_logps(model, params, prompts, prompt_mask,
                                                    batch["kl_responses"],
                                                    batch["kl_response_mask"]))
    if ref_params is None:
        ref, ref_kl = batch["ref_logps"], batch["ref_kl_logps"]
    else:
        ref, ref_kl = (jax.lax.stop_gradient(response_logps(model, ref_params, prompts,
                                                            prompt_mask, r, m))
                       for r, m in ((batch["responses"], batch["response_mask"]),
                                    (batch["kl_responses"], batch["kl_response_mask"])))
    present = (batch["response_mask"].sum(-1) > 0).reshape(-1)
    kl_present = (batch["kl_response_mask"].sum(-1) > 0).reshape(-1)
    value, metrics = kto_loss(logps.reshape(-1), ref.reshape(-1), kl_logps.reshape(-1),
                              ref_kl.reshape(-1), batch["ranking"].reshape(-1), mask=present,
                              kl_mask=kl_present, axis_name=axis_name, **hparams)
    return value, {"loss": value, **metrics}
