"""Stage 3: PPO against the reward model with a per-token KL to the SFT policy, then evaluation.

The RL loop calls the compiled iteration (:mod:`rlhf_jax.rl.ppo`) once per iteration; on the host
it only judges the iteration's samples with the gold judge (evaluation-only over-optimisation
signals: RM–gold gap, RM agreement with gold on the policy's own samples), logs, and checkpoints.
At the end it evaluates SFT, RLHF and best-of-N on the held-out prompts under the pinned protocol
(:mod:`rlhf_jax.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from rlhf_jax import scripts
from rlhf_jax.checkpoint import Checkpointer, save_params
from rlhf_jax.configs import check, check_numbers, positive, to_dict
from rlhf_jax.data.batching import EpochOrder, encode_prompts, pack_documents
from rlhf_jax.data.tokenizers import stop_ids
from rlhf_jax.evaluate import (best_of_n, heldout_signals, judge_all, paired_outcomes,
                               rm_gold_agreement, versus_reference, versus_summary)
from rlhf_jax.loop import NonFiniteError, key_data, truncate_metrics
from rlhf_jax.models import create_model
from rlhf_jax.models.functional import transplant
from rlhf_jax.parallel import (AXIS, check_divisible, data_parallel, make_mesh, replicate,
                               shard_batch, to_host)
from rlhf_jax.rl.kl_control import RunningMoments
from rlhf_jax.rl.ppo import Frozen, Models, PPOHParams, PPOState, make_iteration
from rlhf_jax.runs import RunDir, read_metrics
from rlhf_jax.stages.common import (STREAM_INIT, STREAM_TRAIN, eval_key, load_stage,
                                    model_config, pipeline_task, read_config, stage_key,
                                    upstream_run)
from rlhf_jax.stages.lm import SFTConfig
from rlhf_jax.stages.reward import RewardConfig, check_task_reward, load_reward_model
from rlhf_jax.train import OptimConfig, TrainState, make_optimizer

STREAM_BEST_OF_N = 4


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

    def __post_init__(self):
        check_numbers(self)
        check_task_reward(self.reward, "reward.data")
        positive(self, "iterations", "ptx_rows", "best_of_n", "log_every")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        check(self.eval_every >= 0, "eval_every", "must be >= 0")
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
    check((hp.rollout_size // n) % hp.minibatches == 0, "ppo.minibatches",
          f"each of {n} devices holds {hp.rollout_size // n} sequences, which do not divide "
          f"into {hp.minibatches} minibatches")
    if hp.ptx_coef > 0:
        check_divisible(cfg.ptx_rows, mesh, "ptx_rows", "pretraining rows per update")


def sharded_iteration(models: Models, hp: PPOHParams, mesh, **kw):
    """The compiled PPO iteration, data-parallel over ``mesh``: prompts, example ids and
    pretraining rows split over devices; the rollout comes back split the same way."""

    probe = make_iteration(models, hp, **kw)   # only to learn the metric names
    batch_spec = {"prompts": P(AXIS), "prompt_mask": P(AXIS), "example_ids": P(AXIS)}
    if hp.ptx_coef > 0:
        batch_spec["ptx"] = P(None, AXIS)

    def shapes(state, batch, key):
        return jax.eval_shape(probe, state, batch, key)[1]

    def wrapped(state, batch, key):
        return make_iteration(models, hp, axis_name=AXIS, **kw)(state, batch, key)

    cache: dict = {}

    def run(state, batch, key):
        if "fn" not in cache:
            names = shapes(state, batch, key)
            specs = {k: P() for k in names if k != "rollout"}
            specs["rollout"] = P(AXIS)
            cache["fn"] = data_parallel(wrapped, mesh, batch_spec=batch_spec,
                                        out_specs=(P(), specs))
        return cache["fn"](state, shard_batch(batch, mesh, batch_spec), key)

    return run


def init_state(models: Models, sft_params, rm_params, cfg: PPOConfig) -> PPOState:
    """Policy from SFT (plus a fresh value head if shared), value model from the RM."""
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
    return PPOState(
        policy=TrainState.create(policy_params, make_optimizer(cfg.policy_optim, updates)),
        value=value, kl_coef=jnp.asarray(hp.kl_coef, jnp.float32),
        reward_moments=RunningMoments.create(), iteration=jnp.zeros((), jnp.int32),
        frozen=Frozen(ref=sft_params, rm=rm_params))


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


def _host_signals(task, tok, prompts_flat, rollout) -> tuple[dict[str, float], np.ndarray]:
    """Gold-judge signals of an iteration's samples (evaluation only; never fed to training)."""
    resp = np.asarray(rollout["responses"])
    rm = np.asarray(rollout["rm_score"])
    texts = [tok.decode(r) for r in resp.tolist()]
    gold = np.asarray([j.score for j in judge_all(task, prompts_flat, texts)], np.float32)
    i, j = np.triu_indices(len(gold), 1)
    differ = gold[i] != gold[j]
    agree = np.sign(rm[i] - rm[j]) == np.sign(gold[i] - gold[j])
    return {"rollout/gold": float(gold.mean()),
            "rollout/rm_gold_gap": float(rm.mean() - gold.mean()),
            "rollout/rm_gold_agreement": float(agree[differ].mean()) if differ.any() else
            float("nan")}, gold


def _check_finite(metrics: dict, iteration: int, mode: str, run: RunDir) -> None:
    """Stop (``mode="stop"``) before any checkpoint when an iteration's metrics are not finite
    or one of its updates was skipped for a non-finite gradient."""
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if metrics.get("train/finite", 1.0) < 1.0:
        bad.append("train/finite")
    if bad and mode == "stop":
        host = {k: float(v) for k, v in metrics.items()}
        run.write_json("nonfinite.json", {"stage": "ppo", "iteration": iteration, **host})
        raise NonFiniteError(
            f"ppo: iteration {iteration} produced non-finite values in {', '.join(bad)}; no "
            f"checkpoint after it was written. Metrics: "
            + ", ".join(f"{k}={v:.6g}" for k, v in sorted(host.items()))
            + " (set policy_optim.on_nonfinite='skip' to skip such updates)")


def run_ppo(cfg: PPOConfig, out: str | Path) -> dict:
    """Reward stage (unless ``cfg.reward_dir``), then PPO and the final evaluation into ``out``."""
    mesh = make_mesh()
    check_ppo_sharding(cfg, mesh)
    out = Path(out)
    reward_dir = upstream_run(cfg.reward_dir, out / "reward", scripts.load("reward").run,
                              cfg.reward,
                              "reward_dir")
    reward_cfg = read_config(reward_dir, RewardConfig)
    check_task_reward(reward_cfg, "reward_dir")
    sft_cfg, ref, sft_params = load_stage(reward_cfg.sft_dir, SFTConfig,
                                          config_of=lambda c: c.pretrain)
    pre = sft_cfg.pretrain
    tcfg = pre.task
    _, score, rm_params = load_reward_model(reward_dir, tcfg.prompt_len)
    score_jit = jax.jit(score)
    cfg = dataclasses.replace(cfg, reward_dir=str(reward_dir), reward=reward_cfg)
    hp = cfg.ppo
    task = pipeline_task(pre)
    tok = task.tokenizer
    norm = json.loads((Path(reward_dir) / "reward_norm.json").read_text())
    gain, bias = (norm["gain"], norm["bias"]) if cfg.normalize_rm else (1.0, 0.0)

    t0 = time.perf_counter()
    run = RunDir(out)
    run.write_config(to_dict(cfg))
    run.write_meta(seed=cfg.seed)
    heads = ("value",) if hp.critic == "shared" else ()
    policy = create_model(model_config(pre), jax.random.key(0), heads=heads)[0]
    value = create_model(model_config(pre), jax.random.key(0), heads=("value",))[0] \
        if hp.critic == "separate" else None
    models = Models(policy=policy, ref=ref, rm=score, value=value)
    state = init_state(models, sft_params, rm_params, cfg)

    key = stage_key(cfg.seed, STREAM_TRAIN)
    ckpt = Checkpointer(run.path / "checkpoints")
    start = ckpt.latest_step() or 0
    if start:
        restored, extra = ckpt.restore(state.trainable(), start)
        if extra.get("key", key_data(key)) != key_data(key):
            raise ValueError(f"{ckpt.directory}/{start}: checkpoint was written with another "
                             "PRNG key (another seed?); use a new run directory")
        state = state.replace(**restored)
        truncate_metrics(run, start)

    train_prompts = task.prompts("train")
    p_ids, p_mask = encode_prompts(tok, train_prompts, tcfg.prompt_len)
    order = EpochOrder(len(train_prompts), hp.prompts_per_iter, cfg.seed)
    updates = hp.epochs * hp.minibatches
    ptx_data = ptx_order = None
    if hp.ptx_coef > 0:
        ptx_data = pack_documents(tok, task.pretraining_corpus(), pre.seq_len)
        ptx_order = EpochOrder(len(ptx_data["tokens"]), updates * cfg.ptx_rows, cfg.seed + 1)

    state = replicate(state, mesh)
    iteration = sharded_iteration(models, hp, mesh, max_new_tokens=tcfg.max_new_tokens,
                                  eos_id=stop_ids(tok), pad_id=tok.pad_id, rm_gain=gain,
                                  rm_bias=bias)
    example_ids = np.arange(hp.rollout_size)
    bar = tqdm(range(start, cfg.iterations), desc="ppo", initial=start, total=cfg.iterations,
               disable=None if jax.process_index() == 0 else True, dynamic_ncols=True,
               leave=False)
    t_loop = time.perf_counter()
    for it in bar:
        idx = order.indices(it)
        batch = {"prompts": p_ids[idx], "prompt_mask": p_mask[idx], "example_ids": example_ids}
        if ptx_order is not None:
            rows = ptx_order.batch(ptx_data, it)
            batch["ptx"] = {k: v.reshape(updates, cfg.ptx_rows, -1) for k, v in rows.items()}
        state, metrics = iteration(state, batch, jax.random.fold_in(key, it))
        rollout = metrics.pop("rollout")
        done = it + 1
        _check_finite(jax.device_get(metrics), it, cfg.policy_optim.on_nonfinite, run)
        eval_now = cfg.eval_every > 0 and done % cfg.eval_every == 0
        if done % cfg.log_every == 0 or done == cfg.iterations or eval_now:
            flat_prompts = [train_prompts[i] for i in idx for _ in range(hp.group_size)]
            host, _ = _host_signals(task, tok, flat_prompts, to_host(rollout))
            row = {k: float(v) for k, v in jax.device_get(metrics).items()}
            row.update(host)
            if eval_now:   # before the next iteration donates the parameters
                row.update(heldout_signals(policy, state.policy.params, ref, state.frozen.ref,
                                           task, tcfg, eval_key(pre.seed)))
            run.log_metrics(done, row)
            bar.set_postfix(rm=f"{row['rollout/rm_score']:.2f}", gold=f"{row['rollout/gold']:.2f}",
                            kl=f"{row['kl/per_sequence']:.2f}")
        if done == cfg.iterations or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            ckpt.save(done, state.trainable(),
                      extra={"next_step": done, "key": key_data(key)})
    jax.block_until_ready(state.policy.params)
    run.log_timing(stage="ppo", steps=cfg.iterations - start, seconds=time.perf_counter() - t_loop)
    ckpt.close()
    policy_params = state.policy.params
    sft_params, rm_params = state.frozen.ref, state.frozen.rm   # the loop donated the originals
    save_params(run.path / "params", policy_params)
    train_s = time.perf_counter() - t0

    # --- held-out evaluation (pinned protocol, paired with SFT by prompt and sample index) ---
    t_eval = time.perf_counter()
    vs = versus_reference(policy, policy_params, ref, sft_params, task, tcfg, eval_key(pre.seed),
                          run=run, name="rlhf")
    bon_m, bon_rec = best_of_n(ref, sft_params, score_jit, rm_params, task, tcfg,
                               stage_key(cfg.seed, STREAM_BEST_OF_N), n=cfg.best_of_n)
    run.write_jsonl("samples_best_of_n.jsonl", bon_rec)
    bon_pair = paired_outcomes(bon_rec, vs.ref_records, task.top_score)
    rm_on_policy = rm_gold_agreement(score_jit, rm_params, task, tcfg, vs.records)
    eval_s = time.perf_counter() - t_eval

    upstream = {**RunDir(reward_cfg.sft_dir).read_summary(), **RunDir(reward_dir).read_summary()}
    last = read_metrics(run.path)
    _plot(run, last)
    final = last[-1] if last else {}
    n = cfg.best_of_n
    summary = {
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
                                            "kl/coef", "rollout/logprob_max_diff")
           if k in final},
        "max/rollout/logprob_max_diff": max((r.get("rollout/logprob_max_diff", 0.0)
                                             for r in last), default=0.0),
        **{k: v for k, v in upstream.items() if k.startswith("time_s/")},
        "time_s/ppo": train_s,
        "time_s/ppo_eval": eval_s,
    }
    run.write_summary(summary)
    return summary
