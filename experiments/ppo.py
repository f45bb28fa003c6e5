"""RLHF with PPO: optimise the reward model's score with a per-token KL penalty to the SFT policy
(InstructGPT's stage 3), then evaluate SFT, RLHF and best-of-N on held-out prompts.

Starts from a finished reward run (``--reward-dir``); with only ``--out`` it runs the default
pretrain + SFT + reward stages first.

    python experiments/ppo.py --out runs/ppo --reward-dir runs/reward
    python experiments/ppo.py --help                    # every option
"""

from rlhf_jax import launch


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.ppo import PPOConfig, run_ppo

    return cli.main(PPOConfig, run_ppo, argv, description=__doc__)


if __name__ == "__main__":
    launch.setup()
    main()


from rlhf_jax.stages.ppo import run_ppo as run  # noqa: E402  (until ppo.py holds its composition)
