"""Offline preference optimisation: DPO (default), IPO, SimPO or ORPO on the labelled K-wise
comparisons the reward model was trained on, or KTO on one binary label per response of them;
then the held-out evaluation of SFT and the policy under the pinned protocol (paired outcomes vs
SFT, exact KL to SFT). Every loss starts from the SFT model except ORPO, which replaces SFT and
starts from the pretrained one.

Starts from a finished reward run (``--reward-dir``; its SFT model and its stored comparisons);
with only ``--out`` it runs the default pretrain + SFT + reward stages first.

    python experiments/dpo.py --out runs/dpo --reward-dir runs/reward
    python experiments/dpo.py --out runs/ipo --reward-dir runs/reward --loss ipo
    python experiments/dpo.py --out runs/kto --reward-dir runs/reward --loss kto
    python experiments/dpo.py --help                    # every option

On human preference files from a Hugging Face checkpoint (policy and reference start from it;
the test split's log-ratios are scored; the policy is exported):

    python experiments/dpo.py --out runs/dpo-hh --init-from CKPT --reward.data hh-rlhf \
        --reward.data-dir DIR --export-hf runs/dpo-hh-hf
"""

from rlhf_jax import launch

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

import dataclasses
import functools
import time
from pathlib import Path

import numpy as np

from rlhf_jax import cli
from rlhf_jax.data.batching import check_tokens
from rlhf_jax.evaluate import heldout_signals, versus_reference, versus_summary
from rlhf_jax.losses.preference import REFERENCE_FREE
from rlhf_jax.parallel import check_divisible, make_mesh
from rlhf_jax.models.hf import save_pretrained
from rlhf_jax.runs import RunDir, final_metrics
from rlhf_jax.stages.common import (epoch_order, eval_key, load_stage, model_config,
                                    pipeline_task, read_config, train_stage, upstream_run)
from rlhf_jax.data.binary_feedback import VERSION as FEEDBACK_VERSION
from rlhf_jax.data.binary_feedback import binary_feedback, mismatched
from rlhf_jax.data.binary_feedback import dataset_name as feedback_name
from rlhf_jax.stages.lm import PretrainConfig, SFTConfig
from rlhf_jax.stages.offline import (STARTS_FROM_BASE, OfflineConfig, kto_loss_fn,
                                     offline_arrays, offline_loss_fn, precompute_logps)
from rlhf_jax.stages.file_checks import check_export_run_dir
from rlhf_jax.stages.reward import (RewardConfig, check_task_reward, read_preferences,
                                    store_and_reload)
from rlhf_jax.stages.reward_files import pairwise_metrics, start_file_run


def run(cfg: OfflineConfig, out: str | Path) -> dict:
    """Reward stage (unless ``cfg.reward_dir``), then offline preference training from SFT on its
    train comparisons, then the held-out evaluation, into ``out``; returns the summary. On
    preference files (``cfg.reward.data``): :func:`run_files`."""
    check_divisible(cfg.batch_prompts, make_mesh(), "batch_prompts", "global batch of prompts")
    if cfg.reward.data != "simulated":
        return run_files(cfg, out)
    out = Path(out)
    reward_dir = upstream_run(cfg.reward_dir, out / "reward", "reward",
                              cfg.reward, "reward_dir")
    reward_cfg = read_config(reward_dir, RewardConfig)
    check_task_reward(reward_cfg, "reward_dir")
    sft_cfg, policy, sft_params = load_stage(reward_cfg.sft_dir, SFTConfig,
                                             config_of=lambda c: c.pretrain)
    cfg = dataclasses.replace(cfg, reward_dir=str(reward_dir), reward=reward_cfg)
    pre = sft_cfg.pretrain
    tcfg = pre.task
    task = pipeline_task(pre)
    name = cfg.loss

    t0 = time.perf_counter()
    run = RunDir(out, upstream=(reward_dir,))
    run.write_config(cfg)
    run.write_meta(seed=cfg.seed)
    # data: the reward run's stored train comparisons (KTO: one noisy binary label per response,
    # stored as its own TFDS data set); the reference's log-probs once, up front
    prefs = read_preferences(Path(reward_cfg.preferences_dir or Path(reward_dir) / "data"),
                             "train", task)
    feedback = {}
    if name == "kto":
        prefs, feedback = binary_feedback(prefs, top_score=task.top_score,
                                          flip=cfg.kto_label_flip, seed=cfg.seed)
        prefs = store_and_reload({"train": prefs}, out / "data", task,
                                 name=feedback_name(task.name), version=FEEDBACK_VERSION)["train"]
    data = offline_arrays(task.tokenizer, prefs, tcfg, max_len=model_config(pre).max_len)
    check_tokens(data, vocab_size=model_config(pre).vocab_size, source="offline: train preferences")
    if name == "kto":
        data.update(mismatched(data))
    ref_params = None
    if name not in REFERENCE_FREE:
        if cfg.reference == "precomputed":
            data["ref_logps"] = precompute_logps(policy, sft_params, data)
            if name == "kto":
                data["ref_kl_logps"] = precompute_logps(policy, sft_params, {
                    **data, "responses": data["kl_responses"],
                    "response_mask": data["kl_response_mask"]})
        else:
            ref_params = sft_params

    # training: the K-wise preference loss (losses/preference.py) through the common loop
    order = epoch_order(len(data["prompts"]), cfg.batch_prompts, cfg.seed, "batch_prompts")
    if name == "kto":
        loss_fn = functools.partial(kto_loss_fn, model=policy, hparams=cfg.loss_hparams(),
                                    ref_params=ref_params)
    else:
        loss_fn = functools.partial(offline_loss_fn, model=policy, loss=name,
                                    hparams=cfg.loss_hparams(), ref_params=ref_params)
    # ORPO replaces SFT: it starts from the pretrained model; every other loss from SFT
    start = (load_stage(sft_cfg.pretrain_dir, PretrainConfig)[2] if name in STARTS_FROM_BASE
             else sft_params)
    key = eval_key(pre.seed)   # the evaluation key every stage uses: the same SFT samples

    def on_step(done, params):
        if not (cfg.eval_every and done % cfg.eval_every == 0):
            return None
        return heldout_signals(policy, params, policy, sft_params, task, tcfg, key)

    params = train_stage(start, loss_fn, lambda s: order.batch(data, s), seed=cfg.seed,
                         steps=cfg.steps, optim=cfg.optim, run=run, prefix=name,
                         log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                         fsdp=cfg.fsdp, on_step=on_step if cfg.eval_every else None)
    train_s = time.perf_counter() - t0

    # held-out evaluation: pinned protocol, paired with SFT by prompt and sample index
    t_eval = time.perf_counter()
    vs = versus_reference(policy, params, policy, sft_params, task, tcfg, key, run=run, name=name)
    eval_s = time.perf_counter() - t_eval

    upstream = {**RunDir(reward_cfg.sft_dir).read_summary(), **RunDir(reward_dir).read_summary()}
    summary = {
        "gold/base": upstream.get("gold/base"),
        **vs.ref_metrics, **vs.metrics,
        **versus_summary(vs.pair, f"{name}_vs_sft"),
        "win_rate/ceiling": vs.pair["ceiling"],
        f"kl/{name}_vs_sft": float(vs.kl.mean()),
        "preferences/train_prompts": len(prefs.prompts),
        "start": "base" if name in STARTS_FROM_BASE else "sft",
        **{f"binary_feedback/{k}": v for k, v in feedback.items()},
        **final_metrics(run.path, name),
        **{k: v for k, v in upstream.items() if k.startswith("time_s/")},
        "time_s/offline": train_s,
        "time_s/offline_eval": eval_s,
    }
    run.write_summary(summary)
    return summary


def run_files(cfg: OfflineConfig, out: str | Path) -> dict:
    """DPO (IPO, SimPO, ORPO) on preference files (``cfg.reward.data`` from
    ``cfg.reward.data_dir``) from the checkpoint ``cfg.reward.sft.pretrain.init_from``, the
    reference too, into ``out``; the test split's log-ratios scored at the end; the policy
    optionally exported to ``cfg.export_hf``. Returns the summary."""
    name = cfg.loss
    check_export_run_dir(cfg.export_hf, out)
    t0 = time.perf_counter()
    # a response cut at the budget keeps no EOS (as TRL's DPO): the policy learns no early stop
    run, tok, policy, start, arrays, summary = start_file_run(cfg, cfg.reward, Path(out),
                                                              source=name, eos_when_cut=False)
    data = dict(arrays["train"], lengths=arrays["train"]["response_mask"].sum(-1)
                .astype(np.float32))
    ref_params = None
    if name not in REFERENCE_FREE:
        if cfg.reference == "precomputed":
            data["ref_logps"] = precompute_logps(policy, start, data)
        else:
            ref_params = start
    order = epoch_order(len(data["prompts"]), cfg.batch_prompts, cfg.seed, "batch_prompts")
    loss_fn = functools.partial(offline_loss_fn, model=policy, loss=name,
                                hparams=cfg.loss_hparams(), ref_params=ref_params)
    params = train_stage(start, loss_fn, lambda s: order.batch(data, s), seed=cfg.seed,
                         steps=cfg.steps, optim=cfg.optim, run=run, prefix=name,
                         log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                         fsdp=cfg.fsdp)
    train_s = time.perf_counter() - t0

    # each split's log-ratio log π/π_ref (DPO's implicit reward over β) of chosen vs rejected
    t_eval = time.perf_counter()
    for split in ("test", "train"):
        ref = (data["ref_logps"] if split == "train" and "ref_logps" in data   # computed above
               else precompute_logps(policy, start, arrays[split]))
        ratios = precompute_logps(policy, params, arrays[split]) - ref
        ranking = arrays[split]["ranking"]
        chosen = np.where(ranking[:, :1] >= ranking[:, 1:], ratios[:, :1], ratios[:, 1:])
        summary.update({f"{name}/{split}_logratio_{k}": v
                        for k, v in pairwise_metrics(ratios, ranking).items()})
        summary[f"{name}/{split}_chosen_logratio"] = float(chosen.mean())
    if cfg.export_hf:
        save_pretrained(cfg.export_hf, policy, params, tokenizer=tok)
    summary.update({**final_metrics(run.path, name), "start": "init_from",
                    "time_s/offline": train_s,
                    "time_s/offline_eval": time.perf_counter() - t_eval})
    run.write_summary(summary)
    return summary


def main(argv=None) -> dict:
    return cli.main(OfflineConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
