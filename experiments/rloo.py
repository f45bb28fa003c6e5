"""RLHF with RLOO (Ahmadian et al. 2024): G = 4 samples per prompt, REINFORCE with the
leave-one-out baseline R_i − mean_{j≠i} R_j on the sequence reward R = RM score − β·Σ_t k1 (the KL
to the SFT policy on the reward side); no critic, one update per rollout. Same RM, SFT start,
iterations, RM-scored samples per iteration and held-out evaluation as experiments/ppo.py (summary
keys gold/rlhf etc.).

Every ``--ppo.*`` flag overrides the RLOO preset (``rlhf_jax.rl.presets.rloo_hparams``).

    python experiments/rloo.py --out runs/rloo --reward-dir runs/reward
    python experiments/rloo.py --help                   # every option
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_jax import launch

if TYPE_CHECKING:   # the library is imported inside run/main, after launch.setup()
    from rlhf_jax.stages.ppo import PPOConfig


def run(cfg: PPOConfig, out) -> dict:
    """RLOO is PPO's composition (``experiments/ppo.py``) with the RLOO preset in
    ``cfg.ppo``: same upstream runs, compiled iteration, loop and held-out evaluation."""
    from rlhf_jax import scripts

    return scripts.load("ppo").run(cfg, out)


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.online import online_config
    from rlhf_jax.stages.ppo import PPOConfig

    return cli.main(PPOConfig, run, argv, description=__doc__, default=online_config("rloo"))


if __name__ == "__main__":
    launch.setup()
    main()
