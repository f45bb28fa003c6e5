"""PPO, DPO, IPO, SimPO, GRPO and RLOO on the embedded task from one SFT model and one budget,
3 seeds each: results table (mean ± std, at the defaults and at matched KL) and a gold-vs-KL plot.

With only ``--out`` it first runs the default pretrain + SFT + RM into ``<out>/reward``; pass
``--reward-dir`` to start from a finished reward run instead.

    python experiments/compare.py --out runs/compare
    python experiments/compare.py --out runs/compare --reward-dir runs/pipeline/reward \
        --methods ppo dpo --seeds 0 1
"""

from rlhf_jax import launch


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.compare import CompareConfig, run_compare

    return cli.main(CompareConfig, run_compare, argv, description=__doc__)


if __name__ == "__main__":
    launch.setup()
    main()
