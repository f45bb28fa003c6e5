"""The config of the whole InstructGPT pipeline on one task (pretrain → SFT → preferences + RM →
PPO → evaluation), which ``experiments/pipeline.py`` runs stage by stage.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.configs import check_numbers
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
