"""The whole InstructGPT pipeline on one task: pretrain → SFT → preferences + RM → PPO → evaluation.

Each stage writes its own run directory under ``<out>/`` (``pretrain``, ``sft``, ``reward``,
``ppo``) and starts from the previous one's; a stage that already finished there is reused, so a
killed pipeline continues where it stopped. ``<out>/summary.json`` is the PPO stage's summary
(which holds the base, SFT, RLHF and best-of-N evaluations) plus the total wall time.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rlhf_jax import scripts
from rlhf_jax.configs import check_numbers, to_dict
from rlhf_jax.runs import RunDir
from rlhf_jax.stages.lm import PretrainConfig, SFTConfig, run_pretrain, run_sft
from rlhf_jax.stages.ppo import PPOConfig
from rlhf_jax.stages.reward import RewardConfig, run_reward

run_ppo = scripts.load("ppo").run   # the PPO script's composition


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Attributes:
      seed: the seed of every stage (the task's world has its own, ``pretrain.task.world.seed``).
      pretrain, sft, reward, ppo: the stages' configs (their own ``seed`` and upstream-directory
        fields are set by the pipeline).
    """

    seed: int = 0
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()

    def __post_init__(self):
        check_numbers(self)


def _finished(path: Path) -> bool:
    return (path / "summary.json").exists()


def run_pipeline(cfg: PipelineConfig, out: str | Path) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    run = RunDir(out)
    run.write_config(to_dict(cfg))
    run.write_meta(seed=cfg.seed)
    dirs = {name: out / name for name in ("pretrain", "sft", "reward", "ppo")}
    s = cfg.seed
    if not _finished(dirs["pretrain"]):
        run_pretrain(dataclasses.replace(cfg.pretrain, seed=s), dirs["pretrain"])
    if not _finished(dirs["sft"]):
        run_sft(dataclasses.replace(cfg.sft, seed=s, pretrain_dir=str(dirs["pretrain"])),
                dirs["sft"])
    if not _finished(dirs["reward"]):
        run_reward(dataclasses.replace(cfg.reward, seed=s, sft_dir=str(dirs["sft"])),
                   dirs["reward"])
    if not _finished(dirs["ppo"]):
        run_ppo(dataclasses.replace(cfg.ppo, seed=s, reward_dir=str(dirs["reward"])), dirs["ppo"])
    summary = dict(RunDir(dirs["ppo"]).read_summary())
    summary["time_s/pipeline"] = time.perf_counter() - t0
    run.write_summary(summary)
    return summary
