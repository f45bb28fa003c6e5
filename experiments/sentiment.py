"""Positive-sentiment continuations of real text (Ziegler et al. 2019) through the same stages:
pretrain a small LM on Debian's fortunes (the starting policy — there are no demonstrations, so
SFT runs 0 steps), simulated preferences from the hidden VADER judge, reward model, DPO on the
labelled comparisons, and the held-out evaluation; writes the task's summary keys and
``samples.md``. ``--method NAME`` runs PPO (``ppo``) or another online method of
``rlhf_jax.rl.presets`` (GRPO, RLOO, RAFT, online DPO, …) on the RM in the PPO stage, or another
offline loss (``ipo``, …) in place of DPO.

    apt-get install fortunes                                  # the texts (once)
    python experiments/sentiment.py --out runs/sentiment      # default config (DPO)
    python experiments/sentiment.py --out runs/s1 --pipeline.seed 1
    python experiments/sentiment.py --method ppo --out runs/ppo     # PPO on the RM
    python experiments/sentiment.py --method raft --out runs/raft   # another online method
    python experiments/sentiment.py --help                    # every option
"""

from rlhf_jax import launch

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

import sys
from pathlib import Path

from rlhf_jax import cli, scripts
from rlhf_jax.stages.online import METHODS, split_method
from rlhf_jax.stages.sentiment import OFFLINE_METHODS, SentimentConfig, method_config, report


def run(cfg: SentimentConfig, out: str | Path) -> dict:
    """The pipeline on the sentiment task into ``out`` (finished stages reused; an offline
    method, DPO by default, runs ``experiments/dpo.py`` into ``<out>/<method>`` in place of PPO),
    then the
    task's report: distinct-n, perplexity under the starting policy, the bar, ``samples.md``."""
    stage = cfg.last_stage
    final = None if stage == "ppo" else (stage, "dpo", cfg.offline)
    scripts.load("pipeline").run(cfg.pipeline, out, final=final)
    return report(out, kl_budget=cfg.kl_budget, shown_prompts=cfg.shown_prompts, stage=stage)


def main(argv=None) -> dict:
    method, argv = split_method(list(sys.argv[1:] if argv is None else argv), "dpo",
                                choices=METHODS + OFFLINE_METHODS)
    return cli.main(SentimentConfig, run, argv, description=__doc__,
                    default=method_config(method))


if __name__ == "__main__":
    main()
