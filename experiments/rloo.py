"""RLHF with RLOO (Ahmadian et al. 2024): G = 4 samples per prompt, REINFORCE with the
leave-one-out baseline R_i − mean_{j≠i} R_j on the sequence reward R = RM score − β·Σ_t k1 (the KL
to the SFT policy on the reward side); no critic, one update per rollout. The same as
``experiments/grpo.py --method rloo`` (PPO's composition with the RLOO preset,
``rlhf_jax.rl.presets.rloo_hparams``; every ``--ppo.*`` flag overrides it).

    python experiments/rloo.py --out runs/rloo --reward-dir runs/reward
    python experiments/rloo.py --help                   # every option
"""

from rlhf_jax import launch

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

from rlhf_jax import scripts
from rlhf_jax.stages.ppo import PPOConfig


def run(cfg: PPOConfig, out) -> dict:
    """PPO's composition with the RLOO preset in ``cfg.ppo``."""
    return scripts.load("ppo").run(cfg, out)


def main(argv=None) -> dict:
    return scripts.load("grpo").main(argv, method="rloo", runner=run, description=__doc__)


if __name__ == "__main__":
    main()
