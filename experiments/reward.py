"""Reward modelling, on simulated or on human preferences.

Default (``--data simulated``): collect K-wise preferences with the simulated labeller from the
SFT policy and train a Bradley–Terry reward model initialised from it (runs the default pretrain +
SFT first unless ``--sft-dir`` names a finished SFT run).

Human preference files (``--data hh-rlhf``: Anthropic HH-RLHF; ``--data summarize``: OpenAI
summarize-from-feedback comparisons): ``--data-dir DIR`` holds ``train.jsonl`` and ``test.jsonl``
(each may be ``.jsonl.gz``) in the upstream format; the reward model starts directly from the
Hugging Face checkpoint ``--init-from CKPT`` (no task pretraining or SFT), tokenized with its
``tokenizer.json``, prompts cut to their last ``--max-prompt-tokens``, responses to their first
``--max-response-tokens``; the summary reports test-split pairwise accuracy and mean margin;
``--export-hf DIR`` also writes the trained RM as a sequence classifier.

    python experiments/reward.py --out runs/reward          # default config
    python experiments/reward.py --out runs/rm-hh --init-from gpt2-dir --data hh-rlhf \\
        --data-dir hh-rlhf/helpful-base --no-lm-readout --no-freeze-trunk --export-hf runs/rm-hh-hf
    python experiments/reward.py --help                    # every option
"""

from rlhf_jax import launch


def run(cfg, out) -> dict:   # until this script holds the composition, the stage's runner
    from rlhf_jax.stages.reward import run_reward
    return run_reward(cfg, out)


def main(argv=None) -> dict:
    from rlhf_jax import cli
    from rlhf_jax.stages.reward import RewardConfig, run_reward

    return cli.main(RewardConfig, run_reward, argv, description=__doc__)


if __name__ == "__main__":
    launch.setup()
    main()
