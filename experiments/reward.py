"""Reward modelling: collect K-wise preferences with the simulated labeller from the SFT policy and
train a Bradley–Terry reward model initialised from it (runs the default pretrain + SFT first
unless ``--sft-dir`` names a finished SFT run).

    python experiments/reward.py --out runs/reward          # default config
    python experiments/reward.py --help                    # every option
"""

from rlhf_jax import launch


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.reward import RewardConfig, run_reward

    return cli.main(RewardConfig, run_reward, argv, description=__doc__)


if __name__ == "__main__":
    launch.setup()
    main()
