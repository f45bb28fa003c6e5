"""Reward modelling (stage 2), on simulated or on human preferences.

Default (``--data simulated``): sample K responses per prompt from the SFT policy, let the
simulated labeller rank them, store the comparisons as a TFDS data set, and train a Bradley–Terry
reward model (all C(K,2) pairs of a prompt in one batch) initialised from the SFT model; runs the
default pretrain + SFT first unless ``--sft-dir`` names a finished SFT run.

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

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

import dataclasses
import functools
import time
from pathlib import Path

import jax

from rlhf_jax import cli
from rlhf_jax.data.batching import check_tokens
from rlhf_jax.evaluate import score_groups
from rlhf_jax.labeler import collect_preferences, noise_ceiling
from rlhf_jax.parallel import check_divisible, make_mesh
from rlhf_jax.runs import RunDir
from rlhf_jax.stages.common import (STREAM_LABEL, load_stage, model_config, pipeline_task,
                                    stage_key, upstream_run)
from rlhf_jax.stages.lm import SFTConfig
from rlhf_jax.stages.reward import (RewardConfig, first_prompts, fit_reward_model,
                                    preference_arrays, read_preferences, rm_metrics,
                                    store_and_reload)
from rlhf_jax.stages.reward_files import (export_reward_model, pad_is_eos, pairwise_metrics,
                                          start_file_run)


def run(cfg: RewardConfig, out: str | Path) -> dict:
    """SFT (unless ``cfg.sft_dir``), collect preferences, train the RM into ``out``; with file
    data, :func:`run_files` instead. Returns the summary."""
    if cfg.data != "simulated":
        return run_files(cfg, out)
    check_divisible(cfg.batch_prompts, make_mesh(), "batch_prompts", "global batch of prompts")
    out = Path(out)
    sft_dir = upstream_run(cfg.sft_dir, out / "sft", "sft", cfg.sft, "sft_dir")
    sft_cfg, policy, sft_params = load_stage(sft_dir, SFTConfig, config_of=lambda c: c.pretrain)
    cfg = dataclasses.replace(cfg, sft_dir=str(sft_dir), sft=sft_cfg)
    pre = sft_cfg.pretrain
    tcfg = pre.task
    task = pipeline_task(pre)

    t0 = time.perf_counter()
    run = RunDir(out, upstream=(sft_dir,))
    run.write_config(cfg)
    run.write_meta(seed=cfg.seed)
    # comparisons: K SFT samples per prompt ranked by the simulated labeller, stored as TFDS
    if cfg.preferences_dir:
        prefs = {s: read_preferences(Path(cfg.preferences_dir), s, task)
                 for s in ("train", "heldout")}
    else:
        label_key = stage_key(cfg.seed, STREAM_LABEL)
        collect = functools.partial(collect_preferences, policy, sft_params, task,
                                    cfg=cfg.labeler, max_new_tokens=tcfg.max_new_tokens,
                                    prompt_len=tcfg.prompt_len)
        prefs = {split: collect(task.prompts(split), jax.random.fold_in(label_key, i),
                                seed=cfg.seed * 1000 + i)
                 for i, split in enumerate(("train", "heldout"))}
        prefs = store_and_reload(prefs, out / "data", task)
    train_prefs, test_prefs = first_prompts(prefs["train"], cfg.train_prompts), prefs["heldout"]
    collect_s = time.perf_counter() - t0

    # the RM: the SFT trunk + a scalar head, K-wise Bradley–Terry loss, then normalised
    max_len = model_config(pre).max_len
    data = preference_arrays(task.tokenizer, train_prefs, tcfg, max_len=max_len)
    check_tokens(data, vocab_size=model_config(pre).vocab_size, source="reward: train preferences")
    _, rm_params, score_jit, (gain, bias) = fit_reward_model(
        cfg, model_config(pre), sft_params, data, prompt_len=tcfg.prompt_len, run=run)

    # held-out: accuracy against the noisy labels and agreement with the gold judge
    test_rewards = score_groups(score_jit, rm_params,
                                preference_arrays(task.tokenizer, test_prefs, tcfg,
                                                  max_len=max_len))
    summary = rm_metrics(test_rewards, test_prefs, cfg.labeler.tau, kinds=task.kinds)
    summary.update({
        "rm/noise_ceiling_train": noise_ceiling(train_prefs.gold, cfg.labeler.tau),
        "rm/norm_gain": gain, "rm/norm_bias": bias,
        "preferences/train_prompts": len(train_prefs.prompts),
        "preferences/heldout_prompts": len(test_prefs.prompts),
        "time_s/collect": collect_s,
        "time_s/reward": time.perf_counter() - t0,
    })
    run.write_summary(summary)
    return summary


def run_files(cfg: RewardConfig, out: str | Path) -> dict:
    """The RM on preference files (``cfg.data`` = ``hh-rlhf`` or ``summarize``) from the
    checkpoint ``cfg.sft.pretrain.init_from`` into ``out``; optionally exported to
    ``cfg.export_hf``."""
    check_divisible(cfg.batch_prompts, make_mesh(), "batch_prompts", "global batch of prompts")
    cfg.check_run_dir(out)
    t0 = time.perf_counter()
    run, tok, model, params, arrays, summary = start_file_run(cfg, cfg, Path(out),
                                                              source="reward")
    prepare_s = time.perf_counter() - t0

    rm, rm_params, score_jit, norm = fit_reward_model(
        cfg, model.cfg, params, arrays["train"], prompt_len=cfg.max_prompt_tokens, run=run)
    for split, prefix in (("test", "rm/"), ("train", "rm/train_")):
        rewards = score_groups(score_jit, rm_params, arrays[split])
        summary.update({f"{prefix}{k}": v
                        for k, v in pairwise_metrics(rewards, arrays[split]["ranking"]).items()})
    if cfg.export_hf:
        summary["export/score_shift"] = export_reward_model(
            cfg.export_hf, dataclasses.replace(rm, source=model.source), rm_params, norm, tok)
        summary["export/pad_is_eos"] = pad_is_eos(tok)
    summary.update({"rm/norm_gain": norm[0], "rm/norm_bias": norm[1],
                    "time_s/prepare": prepare_s, "time_s/reward": time.perf_counter() - t0})
    run.write_summary(summary)
    return summary


def main(argv=None) -> dict:
    return cli.main(RewardConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
