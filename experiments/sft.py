"""Supervised fine-tuning on the demonstrator's answers (runs the default pretraining first unless
``--pretrain-dir`` names a finished pretraining run).

    python experiments/sft.py --out runs/sft                # default config (pretrain + SFT)
    python experiments/sft.py --help                        # every option
"""

from rlhf_jax import launch


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.lm import SFTConfig, run_sft

    return cli.main(SFTConfig, run_sft, argv, description=__doc__)


if __name__ == "__main__":
    launch.setup()
    main()
