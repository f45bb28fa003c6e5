"""RLHF with GRPO (Shao et al. 2024): G = 4 samples per prompt, group-normalised advantages
(R_i − mean_g R)/std_g R, PPO's clipped ratio averaged per sequence (1/|o_i|), and β·k3 to the SFT
policy in the loss; no critic. Same RM, SFT start, iterations, RM-scored samples per iteration and
held-out evaluation as experiments/ppo.py (summary keys gold/rlhf etc.).

Every ``--ppo.*`` flag overrides the GRPO preset (``rlhf_jax.rl.presets.grpo_hparams``); e.g.
``--ppo.advantage dr_grpo --ppo.loss-aggregation budget`` is Dr. GRPO (Liu et al. 2025).

    python experiments/grpo.py --out runs/grpo --reward-dir runs/reward
    python experiments/grpo.py --help                   # every option
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_jax import launch

if TYPE_CHECKING:   # the library is imported inside run/main, after launch.setup()
    from rlhf_jax.stages.ppo import PPOConfig


def run(cfg: PPOConfig, out) -> dict:
    """GRPO is PPO's composition (``experiments/ppo.py``) with the GRPO preset in
    ``cfg.ppo``: same upstream runs, compiled iteration, loop and held-out evaluation."""
    from rlhf_jax import scripts

    return scripts.load("ppo").run(cfg, out)


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.online import online_config
    from rlhf_jax.stages.ppo import PPOConfig

    return cli.main(PPOConfig, run, argv, description=__doc__, default=online_config("grpo"))


if __name__ == "__main__":
    launch.setup()
    main()
