"""RLHF with PPO: optimise the reward model's score with a per-token KL penalty to the SFT policy
(InstructGPT's stage 3), then evaluate SFT, RLHF and best-of-N on held-out prompts.

Starts from a finished reward run (``--reward-dir``); with only ``--out`` it runs the default
pretrain + SFT + reward stages first. GRPO and RLOO (``grpo.py``, ``rloo.py``) are presets of the
same iteration, run by this script's ``run``.

    python experiments/ppo.py --out runs/ppo --reward-dir runs/reward
    python experiments/ppo.py --help                    # every option
"""

from rlhf_jax import launch

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

import dataclasses
import time
from pathlib import Path

import jax

from rlhf_jax import cli
from rlhf_jax.checkpoint import Checkpointer, save_params
from rlhf_jax.loop import fit, resume
from rlhf_jax.parallel import make_mesh, replicate
from rlhf_jax.runs import RunDir
from rlhf_jax.stages import ppo
from rlhf_jax.stages.common import STREAM_TRAIN, stage_key, upstream_run
from rlhf_jax.stages.ppo import PPOConfig


def run(cfg: PPOConfig, out: str | Path) -> dict:
    """Reward stage (unless ``cfg.reward_dir``), then PPO and the final evaluation into ``out``;
    returns the summary."""
    mesh = make_mesh()
    ppo.check_ppo_sharding(cfg, mesh)
    out = Path(out)
    reward_dir = upstream_run(cfg.reward_dir, out / "reward", "reward", cfg.reward, "reward_dir")
    t0 = time.perf_counter()
    # SFT policy = reference, RM, task; every model in cfg.precision ("" = the upstream's)
    up = ppo.load_upstream(reward_dir, cfg.normalize_rm, cfg.precision)
    cfg = dataclasses.replace(cfg, reward_dir=str(reward_dir), reward=up.reward_cfg)
    run = RunDir(out, upstream=(reward_dir,))
    run.write_config(cfg)
    run.write_meta(seed=cfg.seed)

    # models: policy (and value) from SFT and the RM; reference and RM frozen, never donated
    models = ppo.build_models(up, cfg.ppo)
    state, frozen = ppo.init_state(models, up.sft_params, up.rm_params, cfg)
    key = stage_key(cfg.seed, STREAM_TRAIN)
    ckpt = Checkpointer(run.path / "checkpoints")
    state = replicate(resume(state, ckpt, run, key, stage="ppo"), mesh)
    frozen = replicate(frozen, mesh)

    # the compiled iteration (rollout, rewards, advantages, epochs × minibatches, KL control)
    # through the common loop; the gold judge and held-out evaluation are its host-side hooks
    iteration = ppo.sharded_iteration(models, cfg.ppo, mesh, **ppo.iteration_kwargs(up))
    batches = ppo.PromptBatches(cfg, up)
    state = fit(state, lambda st, batch, k: iteration(st, frozen, batch, k), batches,
                steps=cfg.iterations, key=key, run=run, prefix="ppo", log_every=cfg.log_every,
                checkpoint_every=cfg.checkpoint_every, ckpt=ckpt,
                on_nonfinite=cfg.policy_optim.on_nonfinite, key_prefix="",
                finite_key="train/finite", all_finite=True,
                on_log=ppo.judge_rollout(up.task, batches, run),
                on_step=ppo.heldout_every(cfg, models, frozen, up),
                stop=ppo.kl_stop_rule(cfg, run),
                show={"rm": "rollout/rm_score", "gold": "rollout/gold", "kl": "kl/per_sequence"})
    ckpt.close()
    save_params(run.path / "params", state.policy.params)
    train_s = time.perf_counter() - t0

    # held-out evaluation: SFT, RLHF and best-of-N under the pinned protocol; the summary
    t_eval = time.perf_counter()
    summary = ppo.final_evaluation(cfg, run, models, state.policy.params, up,
                                   times={"time_s/ppo": train_s})
    summary["ppo/iterations_run"] = int(jax.device_get(state.step))   # < iterations: kl_stop
    summary["time_s/ppo_eval"] = time.perf_counter() - t_eval
    run.write_summary(summary)
    return summary


def main(argv=None) -> dict:
    return cli.main(PPOConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
