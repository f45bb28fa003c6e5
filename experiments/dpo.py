"""Offline preference optimisation: DPO (default), IPO or SimPO from the SFT model on the labelled
K-wise comparisons the reward model was trained on, then the held-out evaluation of SFT and the
policy under the pinned protocol (paired outcomes vs SFT, exact KL to SFT).

Starts from a finished reward run (``--reward-dir``; its SFT model and its stored comparisons);
with only ``--out`` it runs the default pretrain + SFT + reward stages first.

    python experiments/dpo.py --out runs/dpo --reward-dir runs/reward
    python experiments/dpo.py --out runs/ipo --reward-dir runs/reward --loss ipo
    python experiments/dpo.py --help                    # every option
"""

from rlhf_jax import launch


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.offline import OfflineConfig, run_offline

    return cli.main(OfflineConfig, run_offline, argv, description=__doc__)


if __name__ == "__main__":
    launch.setup()
    main()
