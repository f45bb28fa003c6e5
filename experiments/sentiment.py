"""Positive-sentiment continuations of real text (Ziegler et al. 2019) through the same stages:
pretrain a small LM on Debian's fortunes (the starting policy — there are no demonstrations, so
SFT runs 0 steps), simulated preferences from the hidden VADER judge, reward model, PPO, and the
held-out evaluation; writes the task's summary keys and ``samples.md``.

    apt-get install fortunes                                  # the texts (once)
    python experiments/sentiment.py --out runs/sentiment      # default config
    python experiments/sentiment.py --out runs/s1 --pipeline.seed 1
    python experiments/sentiment.py --help                    # every option
"""

from rlhf_jax import launch


def run(cfg, out) -> dict:
    """The pipeline on the sentiment task into ``out`` (resumable), then its report."""
    from rlhf_jax.stages.sentiment import run_sentiment

    return run_sentiment(cfg, out)


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.sentiment import SentimentConfig

    return cli.main(SentimentConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    launch.setup()
    main()
