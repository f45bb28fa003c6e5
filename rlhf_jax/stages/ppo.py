"""PPO's library pieces (InstructGPT's stage 3): config, upstream runs, state, batches, host-side
judging and the final evaluation. ``experiments/ppo.py`` composes them (GRPO and RLOO are presets
of the same iteration, :mod:`rlhf_jax.stages.online`).

The loop (``rlhf_jax.loop.fit``) calls the compiled iteration (:mod:`rlhf_jax.rl.ppo`) once per
iteration; on the host it only judges logged iterations' samples with the gold judge
(evaluation-only over-optimisation signals: RM–gold gap, RM agreement with gold on the policy's
own samples), logs, and checkpoints. At the end :func:`final_evaluation` evaluates SFT, RLHF and
best-of-N on the held-out prompts under the pinned protocol (:mod:`rlhf_jax.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from rlhf_jax.configs import check, check_numbers, positive
from rlhf_jax.data.batching import EpochOrder, encode_prompts, pack_documents
from rlhf_jax.data.task import Task
from rlhf_jax.data.tokenizers import stop_ids
from rlhf_jax.evaluate import (best_of_n, heldout_signals, judge_all, paired_outcomes,
                               rm_gold_agreement, versus_reference, versus_summary)
from rlhf_jax.models import create_model
from rlhf_jax.models.functional import Model, transplant
from rlhf_jax.parallel import AXIS, check_divisible, data_parallel, shard_batch, to_host
from rlhf_jax.precision import PRECISIONS
from rlhf_jax.rl.kl_control import RunningMoments
from rlhf_jax.rl.ppo import Frozen, Models, PPOHParams, PPOState, make_iteration
from rlhf_jax.runs import ITERATION_SAMPLES, RunDir, read_metrics
from rlhf_jax.stages.common import (STREAM_INIT, eval_key, load_stage, pipeline_task,
                                    read_config, stage_key)
from rlhf_jax.stages.lm import SFTConfig
from rlhf_jax.stages.reward import RewardConfig, check_task_reward
from rlhf_jax.stages.reward_model import rm_heads, rm_score_fn
from rlhf_jax.train import OptimConfig, TrainState, make_optimizer

STREAM_BEST_OF_N = 4
SAMPLES_PER_LOG = 4                 # judged rollout samples written per logged iteration


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """RLHF with PPO (InstructGPT's stage 3).

    Attributes:
      seed: seeds sampling, minibatch order and evaluation of best-of-N.
      reward_dir: a finished reward run to start from; empty = run ``reward`` first into
        ``<out>/reward`` (which itself runs pretrain + SFT unless told otherwise).
      reward: the reward config used when ``reward_dir`` is empty.
      ppo: the algorithm (see ``rlhf_jax.rl.ppo.PPOHParams``).
      iterations: PPO iterations (each: one rollout, then ``epochs × minibatches`` updates).
      policy_optim: policy optimizer (steps counted per minibatch update).
      value_optim: value-model optimizer (separate critic).
      normalize_rm: apply the reward run's gain and bias (SFT scores → mean 0, std 1).
      ptx_rows: pretraining-corpus rows per minibatch update when ``ppo.ptx_coef > 0``.
      best_of_n: N of the best-of-N baseline (SFT samples reranked by the RM).
      log_every: log metrics every this many iterations.
      checkpoint_every: resumable checkpoint interval in iterations (0 = only at the end).
      eval_every: every this many iterations evaluate the current policy on the held-out prompts
        (pinned protocol) and its exact KL to SFT, logged as ``heldout/<metric>`` for the task's
        headline metrics (facts world: ``gold``, ``fabrication_rate``, ``accuracy``) and
        ``heldout/kl`` (0 = off).
      kl_stop: stop PPO early once the exact KL to SFT of the rollouts (``kl/exact_per_sequence``,
        nats per sequence, the policy that sampled them on training prompts) averaged over the last
        ``kl_stop_window`` iterations reaches this (0 = off; needs ``log_every = 1``). A KL
        budget for the final policy: the held-out KL lands near it (one iteration's drift above).
      kl_stop_window: iterations averaged by ``kl_stop`` (the KL of 64 rollouts is noisy).
      precision: the precision of every model this stage builds (policy, reference, value model,
        RM; ``rlhf_jax.precision``): ``""`` (default) inherits the pretraining run's model
        config, ``"float32"`` or ``"bf16"`` overrides it, e.g. PPO in bf16 from float32 SFT and
        RM runs. bf16 needs ``ppo.rescore_policy`` (π_old from the trainer's forward pass).
    """

    seed: int = 0
    reward_dir: str = ""
    reward: RewardConfig = RewardConfig()
    ppo: PPOHParams = PPOHParams()
    iterations: int = 40
    policy_optim: OptimConfig = OptimConfig(learning_rate=5e-5, warmup_steps=10,
                                            final_lr_frac=1.0, weight_decay=0.0)
    value_optim: OptimConfig = OptimConfig(learning_rate=5e-5, warmup_steps=10,
                                           final_lr_frac=1.0, weight_decay=0.0)
    normalize_rm: bool = True
    ptx_rows: int = 8
    best_of_n: int = 4
    log_every: int = 1
    checkpoint_every: int = 20
    eval_every: int = 0
    kl_stop: float = 0.0
    kl_stop_window: int = 2
    precision: str = ""

    def __post_init__(self):
        check_numbers(self)
        check(self.precision in ("",) + PRECISIONS, "precision",
              f"must be '' (inherit) or one of {PRECISIONS}, got {self.precision!r}")
        check_task_reward(self.reward, "reward.data")
        positive(self, "iterations", "ptx_rows", "best_of_n", "log_every")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        check(self.eval_every >= 0, "eval_every", "must be >= 0")
        check(self.kl_stop >= 0, "kl_stop", "must be >= 0 (0 = off)")
        check(self.kl_stop_window >= 1, "kl_stop_window", "must be >= 1")
        check(not self.kl_stop or self.log_every == 1, "log_every",
              "kl_stop reads every iteration's rollout KL; set log_every 1")
        updates = self.iterations * self.ppo.epochs * self.ppo.minibatches
        for name in ("policy_optim",) + (("value_optim",) if self.ppo.critic == "separate" else ()):
            check(getattr(self, name).warmup_steps <= updates, f"{name}.warmup_steps",
                  f"{getattr(self, name).warmup_steps} exceeds the {updates} updates")


def check_ppo_sharding(cfg: PPOConfig, mesh) -> None:
    """Config-time errors for batches that do not split over the mesh (each device needs whole
    prompts, whole groups and an equal share of every minibatch)."""
    hp = cfg.ppo
    n = mesh.shape[AXIS]
    check_divisible(hp.prompts_per_iter, mesh, "ppo.prompts_per_iter", "prompts per iteration")
    rows = hp.train_rows   # DAPO's kept groups, or 'best''s winners, split over the devices
    if hp.keep_groups:
        check_divisible(hp.keep_groups, mesh, "ppo.keep_groups", "groups kept per iteration")
    check((rows // n) % hp.minibatches == 0, "ppo.minibatches",
          f"each of {n} devices trains on {rows // n} sequences, which do not divide "
          f"into {hp.minibatches} minibatches")
    if hp.ptx_coef > 0:
        check_divisible(cfg.ptx_rows, mesh, "ptx_rows", "pretraining rows per update")


def sharded_iteration(models: Models, hp: PPOHParams, mesh, **kw):
    """The compiled PPO iteration ``(state, frozen, batch, key) -> (state, metrics, rollout)``,
    data-parallel over ``mesh``: prompts, example ids and pretraining rows split over devices (the
    host batch is placed here); state, frozen parameters and metrics replicated; the rollout comes
    back split like the prompts. The state is donated, ``frozen`` is not."""
    batch_spec = {"prompts": P(AXIS), "prompt_mask": P(AXIS), "example_ids": P(AXIS)}
    if hp.ptx_coef > 0:
        batch_spec["ptx"] = P(None, AXIS)
    fn = data_parallel(make_iteration(models, hp, axis_name=AXIS, **kw), mesh,
                       batch_spec=batch_spec, frozen_spec=P(), out_specs=(P(), P(), P(AXIS)))

    def run(state, frozen, batch, key):
        return fn(state, frozen, shard_batch(batch, mesh, batch_spec), key)

    return run


@dataclasses.dataclass(frozen=True)
class Upstream:
    """What PPO starts from: the reward run (RM, its normalisation) and the SFT run it was trained
    on (reference policy = PPO's initial policy), with their task."""

    reward_dir: Path
    reward_cfg: RewardConfig
    pretrain: Any           # the pipeline's PretrainConfig (architecture, task)
    task: Task
    ref: Any                # the SFT model (static half)
    sft_params: Any
    score: Any              # the RM's score function (rlhf_jax.rl.rollout)
    rm_params: Any
    gain: float             # RM normalisation (1, 0 without normalize_rm)
    bias: float


def with_precision(model: Model, precision: str) -> Model:
    """``model`` with its config's precision replaced (``""``: unchanged); same parameters."""
    if not precision or precision == model.cfg.precision:
        return model
    return create_model(model.cfg.replace(precision=precision), jax.random.key(0),
                        heads=model.heads)[0]


def load_upstream(reward_dir: str | Path, normalize_rm: bool, precision: str = "") -> Upstream:
    """The finished reward run in ``reward_dir`` and the SFT run it names; ``precision``
    (``PPOConfig.precision``) replaces the precision of the reference and the RM."""
    reward_cfg = read_config(reward_dir, RewardConfig)
    check_task_reward(reward_cfg, "reward_dir")
    sft_cfg, ref, sft_params = load_stage(reward_cfg.sft_dir, SFTConfig,
                                          config_of=lambda c: c.pretrain)
    pre = sft_cfg.pretrain
    ref = with_precision(ref, precision)
    _, rm, rm_params = load_stage(reward_dir, RewardConfig, heads=rm_heads(reward_cfg.lm_readout),
                                  config_of=lambda c: c.sft.pretrain)
    score = rm_score_fn(reward_cfg, with_precision(rm, precision), pre.task.prompt_len)
    norm = json.loads((Path(reward_dir) / "reward_norm.json").read_text())
    gain, bias = (norm["gain"], norm["bias"]) if normalize_rm else (1.0, 0.0)
    return Upstream(Path(reward_dir), reward_cfg, pre, pipeline_task(pre), ref, sft_params, score,
                    rm_params, gain, bias)


def build_models(up: Upstream, hp: PPOHParams) -> Models:
    """The policy (with a value head if the critic is shared), the reference, the RM and a
    separate value model if the critic is separate; all of the reference's (SFT) architecture and
    precision, so policy and reference run the same code (the KL is exactly 0 while they share
    parameters). bf16 refuses ``rescore_policy=False``: the sampler's cached decoding rounds
    differently from the forward pass that scores the reference."""
    arch = up.ref.cfg
    check(arch.precision != "bf16" or hp.rescore_policy, "ppo.rescore_policy",
          "bf16 runs take π_old from the trainer's forward pass (the reference's code path); "
          "set rescore_policy=True (the default) or precision float32")
    heads = ("value",) if hp.critic == "shared" else ()
    policy = create_model(arch, jax.random.key(0), heads=heads)[0]
    value = create_model(arch, jax.random.key(0), heads=("value",))[0] \
        if hp.critic == "separate" else None
    return Models(policy=policy, ref=up.ref, rm=up.score, value=value)


def iteration_kwargs(up: Upstream) -> dict:
    """The task's sampling and reward settings of ``make_iteration`` / :func:`sharded_iteration`."""
    tok = up.task.tokenizer
    return dict(max_new_tokens=up.pretrain.task.max_new_tokens, eos_id=stop_ids(tok),
                pad_id=tok.pad_id, rm_gain=up.gain, rm_bias=up.bias)


def init_state(models: Models, sft_params, rm_params, cfg: PPOConfig) -> tuple[PPOState, Frozen]:
    """``(state, frozen)``: the policy from SFT (plus the RM's head as a fresh value head if
    shared), the value model from the RM; the frozen reference (SFT) and RM parameters."""
    hp = cfg.ppo
    updates = cfg.iterations * hp.epochs * hp.minibatches
    policy_params = sft_params
    if hp.critic == "shared":   # SFT trunk and LM head, the RM's head as the value head
        policy_params = transplant(rm_params, models.policy.init(stage_key(cfg.seed, STREAM_INIT)),
                                   rename={"reward": "value"})
        policy_params = transplant(sft_params, policy_params)
    policy_params = jax.tree.map(lambda x: x.copy(), policy_params)   # donated by the step
    value = None
    if hp.critic == "separate":
        value_params = transplant(rm_params, models.value.init(stage_key(cfg.seed, STREAM_INIT)),
                                  rename={"reward": "value"})
        value = TrainState.create(jax.tree.map(lambda x: x.copy(), value_params),
                                  make_optimizer(cfg.value_optim, updates))
    state = PPOState(
        policy=TrainState.create(policy_params, make_optimizer(cfg.policy_optim, updates)),
        value=value, kl_coef=jnp.asarray(hp.kl_coef, jnp.float32),
        reward_moments=RunningMoments.create(), step=jnp.zeros((), jnp.int32),
        hparams=hp.scalars(),   # traced: a sweep over them compiles once
        entropy_coef=jnp.asarray(hp.entropy_coef, jnp.float32))
    return state, Frozen(ref=sft_params, rm=rm_params)


class PromptBatches:
    """Host batches of the iterations: ``batch_at(it)`` holds iteration ``it``'s training prompts
    (a pure function of ``it`` and the seed: resumes replay them) and, with ``ptx_coef > 0``, one
    slice of the pretraining corpus per update."""

    def __init__(self, cfg: PPOConfig, up: Upstream):
        hp, tok = cfg.ppo, up.task.tokenizer
        self.prompts = up.task.prompts("train")
        self.ids, self.mask = encode_prompts(tok, self.prompts, up.pretrain.task.prompt_len)
        self.order = EpochOrder(len(self.prompts), hp.prompts_per_iter, cfg.seed)
        self.example_ids = np.arange(hp.rollout_size)
        self.group_size, self.updates, self.ptx_rows = hp.group_size, hp.epochs * hp.minibatches, \
            cfg.ptx_rows
        self.ptx = self.ptx_order = None
        if hp.ptx_coef > 0:
            self.ptx = pack_documents(tok, up.task.pretraining_corpus(), up.pretrain.seq_len)
            self.ptx_order = EpochOrder(len(self.ptx["tokens"]), self.updates * cfg.ptx_rows,
                                        cfg.seed + 1)

    def __call__(self, it: int) -> dict:
        idx = self.order.indices(it)
        batch = {"prompts": self.ids[idx], "prompt_mask": self.mask[idx],
                 "example_ids": self.example_ids}
        if self.ptx_order is not None:
            rows = self.ptx_order.batch(self.ptx, it)
            batch["ptx"] = {k: v.reshape(self.updates, self.ptx_rows, -1) for k, v in rows.items()}
        return batch

    def sample_prompts(self, it: int) -> list:
        """The prompt of each of iteration ``it``'s samples (G per prompt)."""
        return [self.prompts[i] for i in self.order.indices(it) for _ in range(self.group_size)]


def _plot(run: RunDir, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [r["step"] for r in rows]
    panels = [("reward (RM score, normalised)", ["rollout/rm_score"], "reward.png"),
              ("KL(π ‖ π_SFT) per sequence", ["kl/per_sequence", "kl/exact_per_sequence"],
               "kl.png"),
              ("gold score of the policy's samples", ["rollout/gold", "heldout/gold"], "gold.png")]
    for title, keys, name in panels:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for k in keys:
            if k.startswith("heldout/"):   # logged only every eval_every iterations
                pts = [(r["step"], r[k]) for r in rows if k in r]
                if pts:
                    ax.plot(*zip(*pts), "o-", label=k)
                continue
            ax.plot(it, [r.get(k, np.nan) for r in rows], label=k)
        ax.set_xlabel("PPO iteration")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run.path / name, dpi=100)
        plt.close(fig)


def _host_signals(task, tok, prompts_flat, rollout) -> tuple[dict[str, float], list[dict]]:
    """Gold-judge signals of an iteration's samples (evaluation only; never fed to training) and
    the first :data:`SAMPLES_PER_LOG` samples judged (prompt, response, label, gold, RM score)."""
    resp = np.asarray(rollout["responses"])
    rm = np.asarray(rollout["rm_score"])
    texts = [tok.decode(r) for r in resp.tolist()]
    judged = judge_all(task, prompts_flat, texts)
    gold = np.asarray([j.score for j in judged], np.float32)
    samples = [{"uid": p.uid, "prompt": p.text, "response": t, "label": j.label,
                "gold": float(j.score), "rm_score": float(r)}
               for p, t, j, r in list(zip(prompts_flat, texts, judged, rm))[:SAMPLES_PER_LOG]]
    i, j = np.triu_indices(len(gold), 1)
    differ = gold[i] != gold[j]
    agree = np.sign(rm[i] - rm[j]) == np.sign(gold[i] - gold[j])
    return {"rollout/gold": float(gold.mean()),
            "rollout/rm_gold_gap": float(rm.mean() - gold.mean()),
            "rollout/rm_gold_agreement": float(agree[differ].mean()) if differ.any() else
            float("nan")}, samples


def judge_rollout(task: Task, batches: PromptBatches, run: RunDir | None = None):
    """``loop.fit``'s ``on_log`` hook: the gold judge's signals of a logged iteration's samples;
    with ``run``, the first :data:`SAMPLES_PER_LOG` of them judged, to
    ``samples/iter_<iteration>.jsonl`` (one file per logged iteration: a resumed run rewrites
    the same files; read them with ``rlhf_jax.runs.Run.iteration_samples``)."""
    def on_log(done: int, row: dict, rollout) -> dict[str, float]:
        signals, samples = _host_signals(task, task.tokenizer, batches.sample_prompts(done - 1),
                                         to_host(rollout))
        if run is not None:
            run.write_jsonl(f"{ITERATION_SAMPLES}/iter_{done:04d}.jsonl",
                            [{"iteration": done, **r} for r in samples])
        return signals
    return on_log


def heldout_every(cfg: PPOConfig, models: Models, frozen: Frozen, up: Upstream):
    """``loop.fit``'s ``on_step`` hook: every ``eval_every`` iterations the held-out evaluation
    (pinned protocol) and exact KL to SFT of the current policy (None when off)."""
    if not cfg.eval_every:
        return None

    def on_step(done: int, state: PPOState):
        if done % cfg.eval_every == 0:   # before the next iteration donates the parameters
            return heldout_signals(models.policy, state.policy.params, up.ref, frozen.ref,
                                   up.task, up.pretrain.task, eval_key(up.pretrain.seed))
        return None
    return on_step


def kl_stop_rule(cfg: PPOConfig, run: RunDir):
    """``loop.fit``'s ``stop`` hook of ``cfg.kl_stop`` (None when off): True once the mean
    ``kl/exact_per_sequence`` of the last ``kl_stop_window`` logged iterations reaches
    ``kl_stop``. A resumed run seeds the window from the rows already logged (``metrics.jsonl``,
    truncated to the checkpoint by ``loop.resume``), so it stops where an uninterrupted run
    would."""
    if not cfg.kl_stop:
        return None
    key = "kl/exact_per_sequence"
    logged = read_metrics(run.path) if (run.path / "metrics.jsonl").exists() else []
    window = [r[key] for r in logged if key in r][-cfg.kl_stop_window:]

    def stop(done: int, row: dict) -> bool:
        window.append(row[key])
        del window[:-cfg.kl_stop_window]
        return len(window) == cfg.kl_stop_window and float(np.mean(window)) >= cfg.kl_stop
    return stop


def final_evaluation(cfg: PPOConfig, run: RunDir, models: Models, policy_params, up: Upstream,
                     times: dict[str, float]) -> dict:
    """Held-out evaluation of SFT, RLHF and best-of-N (pinned protocol, RLHF paired with SFT by
    prompt and sample index), the iterations' plots, and the summary (upstream summaries'
    ``gold/base`` and ``time_s/*`` included)."""
    task, tcfg, sft_params = up.task, up.pretrain.task, up.sft_params
    score_jit = jax.jit(up.score)
    vs = versus_reference(models.policy, policy_params, up.ref, sft_params, task, tcfg,
                          eval_key(up.pretrain.seed), run=run, name="rlhf")
    bon_m, bon_rec = best_of_n(up.ref, sft_params, score_jit, up.rm_params, task, tcfg,
                               stage_key(cfg.seed, STREAM_BEST_OF_N), n=cfg.best_of_n)
    run.write_jsonl("samples_best_of_n.jsonl", bon_rec)
    bon_pair = paired_outcomes(bon_rec, vs.ref_records, task.top_score)
    rm_on_policy = rm_gold_agreement(score_jit, up.rm_params, task, tcfg, vs.records)

    upstream = {**RunDir(up.reward_cfg.sft_dir).read_summary(),
                **RunDir(up.reward_dir).read_summary()}
    last = read_metrics(run.path)
    _plot(run, last)
    final = last[-1] if last else {}
    n = cfg.best_of_n
    return {
        "gold/base": upstream.get("gold/base"),
        **vs.ref_metrics, **vs.metrics,
        **{f"{k}/best_of_n": bon_m[k] for k in task.headline},
        "win_rate/best_of_n_vs_sft": bon_pair["win_rate"],
        "kl/best_of_n": math.log(n) - (n - 1) / n,
        **versus_summary(vs.pair, "rlhf_vs_sft"),
        "win_rate/ceiling": vs.pair["ceiling"],
        "kl/rlhf_vs_sft": float(vs.kl.mean()),
        "rm/gold_agreement": upstream.get("rm/gold_agreement"),
        "rm/gold_agreement_on_policy": rm_on_policy,
        **{f"final/{k}": final[k] for k in ("rollout/rm_score", "rollout/gold",
                                            "rollout/rm_gold_gap", "rollout/rm_gold_agreement",
                                            "rollout/reward_length_corr", "kl/per_sequence",
                                            "kl/coef", "rollout/logprob_max_diff",
                                            "rollout/logprob_mean_diff")
           if k in final},
        **{f"max/{k}": max((r.get(k, 0.0) for r in last), default=0.0)
           for k in ("rollout/logprob_max_diff", "rollout/logprob_mean_diff")},
        **{k: v for k, v in upstream.items() if k.startswith("time_s/")},
        **times,
    }
