"""The config of the whole InstructGPT pipeline on one task (pretrain → SFT → preferences + RM →
PPO → evaluation), which ``experiments/pipeline.py`` runs stage by stage.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.configs import check, check_numbers
from rlhf_jax.stages.lm import PretrainConfig, SFTConfig
from rlhf_jax.stages.ppo import PPOConfig
from rlhf_jax.stages.reward import RewardConfig


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
        for name in ("pretrain", "sft", "reward", "ppo"):   # flags the pipeline would drop
            check(getattr(self, name).seed in (0, self.seed), f"{name}.seed",
                  "the pipeline seeds every stage with its own --seed; set that instead")
        check(self.sft.data == "task", "sft.data", "the pipeline's SFT learns the task's "
              "demonstrations; SFT on preference files is experiments/sft.py --data")
        for name, up in (("sft", "pretrain"), ("reward", "sft"), ("ppo", "reward")):
            stage = getattr(self, name)
            check(not getattr(stage, f"{up}_dir"), f"{name}.{up}_dir",
                  f"the pipeline starts {name} from its own {up} stage (<out>/{up})")
            check(getattr(stage, up) == type(getattr(stage, up))(), f"{name}.{up}",
                  f"the pipeline runs {name} from its own {up} stage: set --{up}.* instead of "
                  f"--{name}.{up}.*")
