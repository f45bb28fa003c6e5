"""The main job: the full InstructGPT pipeline on the embedded task — pretrain, SFT, simulated
preferences and reward model, PPO — and the held-out evaluation of base, SFT, best-of-N and RLHF.

    python experiments/pipeline.py --out runs/pipeline            # default config
    python experiments/pipeline.py --out runs/seed1 --seed 1      # another seed
    python experiments/pipeline.py --help                         # every option
"""

from rlhf_jax import launch


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.pipeline import PipelineConfig, run_pipeline

    return cli.main(PipelineConfig, run_pipeline, argv, description=__doc__)


if __name__ == "__main__":
    launch.setup()
    main()
