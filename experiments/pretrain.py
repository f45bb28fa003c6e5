"""Pretrain the base model on the embedded task's corpus of facts.

    python experiments/pretrain.py --out runs/pretrain      # default config
    python experiments/pretrain.py --help                  # every option
"""

from rlhf_jax import launch


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.lm import PretrainConfig, run_pretrain

    return cli.main(PretrainConfig, run_pretrain, argv, description=__doc__)


if __name__ == "__main__":
    launch.setup()
    main()
