"""Supervised fine-tuning (stage 1): next-token loss on the demonstrator's answers, response tokens
only, plus a pretraining-replay term; runs the default pretraining first unless ``--pretrain-dir``
names a finished pretraining run. With ``--data hh-rlhf|summarize`` it fine-tunes an imported
checkpoint on the preferred response of each pair of human preference files instead.

    python experiments/sft.py --out runs/sft                # default config (pretrain + SFT)
    python experiments/sft.py --out runs/sft-hh --init-from CKPT --data hh-rlhf --data-dir DIR
    python experiments/sft.py --help                        # every option
"""

from rlhf_jax import launch

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

import dataclasses
import time
from pathlib import Path

import numpy as np

from rlhf_jax import cli
from rlhf_jax.checkpoint import save_params
from rlhf_jax.configs import check
from rlhf_jax.data.batching import pack_documents, sft_examples, sft_rows
from rlhf_jax.evaluate import evaluate_demonstrator, evaluate_heldout
from rlhf_jax.parallel import check_divisible, make_mesh
from rlhf_jax.models.hf import save_pretrained
from rlhf_jax.runs import RunDir, final_metrics
from rlhf_jax.stages.common import eval_key, load_stage, pipeline_task, upstream_run
from rlhf_jax.stages.file_checks import check_export_run_dir
from rlhf_jax.stages.lm import PretrainConfig, SFTConfig, knowledge, train_lm
from rlhf_jax.stages.offline import precompute_logps
from rlhf_jax.stages.reward_files import preferred_responses, start_file_run


def run(cfg: SFTConfig, out: str | Path) -> dict:
    """Pretrain (unless ``cfg.pretrain_dir``), then SFT into ``out``; returns the summary. On
    preference files (``cfg.data``): :func:`run_files`."""
    mesh = make_mesh()
    check_divisible(cfg.batch_size, mesh, "batch_size")
    if cfg.data != "task":   # no replay there
        return run_files(cfg, out)
    if cfg.ptx_coef > 0:
        check_divisible(cfg.ptx_batch_size, mesh, "ptx_batch_size")
    out = Path(out)
    pre_dir = upstream_run(cfg.pretrain_dir, out / "pretrain", "pretrain",
                           cfg.pretrain, "pretrain_dir")
    pre_cfg, model, params = load_stage(pre_dir, PretrainConfig)
    cfg = dataclasses.replace(cfg, pretrain_dir=str(pre_dir), pretrain=pre_cfg)
    tcfg = pre_cfg.task

    t0 = time.perf_counter()
    task = pipeline_task(pre_cfg)
    run = RunDir(out, upstream=(pre_dir,))
    run.write_config(cfg)
    run.write_meta(seed=cfg.seed)
    check(cfg.steps == 0 or task.demonstrations, "steps",
          f"task {task.name!r} has no demonstrations; its starting policy is the pretrained "
          "model: set the SFT steps to 0")
    n_examples, demo = 0, {}
    if cfg.steps:
        # demonstrations: the task's demonstrator answers each training prompt demos_per_prompt
        # times; next-token loss on the response tokens, plus pretraining replay
        rng = np.random.default_rng([cfg.seed, 2])
        prompts = [p for p in task.prompts("train") for _ in range(cfg.demos_per_prompt)]
        demos = [task.demonstration(p, rng) for p in prompts]
        run.write_jsonl("demonstrations.jsonl", ({"uid": p.uid, "prompt": p.text, "response": d}
                                                 for p, d in zip(prompts, demos)))
        try:
            data = sft_examples(task.tokenizer, prompts, demos, prompt_len=tcfg.prompt_len,
                                response_len=tcfg.max_new_tokens)
        except ValueError as e:   # a demonstration longer than the pretraining run's budget
            check(False, "pretrain.task.max_new_tokens", f"{e}: a demonstration does not fit")
        replay = pack_documents(task.tokenizer, task.pretraining_corpus(), pre_cfg.seq_len)
        params = train_lm(model, params, data, seed=cfg.seed, batch_size=cfg.batch_size,
                          steps=cfg.steps, optim=cfg.optim, run=run, prefix="sft",
                          log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                          replay=replay, ptx_coef=cfg.ptx_coef,
                          ptx_batch_size=cfg.ptx_batch_size, fsdp=cfg.fsdp)
        n_examples = len(prompts)
        demo = evaluate_demonstrator(task, task.prompts("heldout"), n_samples=tcfg.eval_samples,
                                     seed=cfg.seed)
    else:   # no demonstrations: the pretrained model is the starting policy, stored as SFT's
        save_params(run.path / "params", params)
    train_s = time.perf_counter() - t0

    # held-out evaluation: the starting policy under the pinned protocol
    held_out, _ = evaluate_heldout(model, params, task, tcfg, eval_key(pre_cfg.seed), run=run,
                                   name="sft")
    pre_summary = RunDir(pre_dir).read_summary()
    summary = {
        **{k: v for k, v in pre_summary.items() if k.endswith("/base") or k == "time_s/pretrain"},
        **held_out, **knowledge(model, params, task, tcfg.prompt_len, "sft"),
        **{f"demonstrator/{k}": v for k, v in demo.items()},
        "sft_examples": n_examples,
        "time_s/sft": train_s,
    }
    run.write_summary(summary)
    return summary


def run_files(cfg: SFTConfig, out: str | Path) -> dict:
    """SFT of the checkpoint ``cfg.pretrain.init_from`` on the preferred response of each train
    pair of the preference files (``cfg.data`` from ``cfg.data_dir``), as TRL's ``SFTTrainer`` on
    HH's chosen dialogues: next-token loss on the response tokens only, no replay. The test
    split's preferred responses are scored before and after (mean NLL per token); the policy is
    optionally exported to ``cfg.export_hf``. Returns the summary."""
    check_export_run_dir(cfg.export_hf, out)
    t0 = time.perf_counter()
    # as for DPO, a response cut at the budget keeps no EOS: the policy learns no early stop
    run, tok, model, start, arrays, summary = start_file_run(
        cfg, cfg, Path(out), source="sft", eos_when_cut=False, ckpt=cfg.pretrain.init_from)
    chosen = preferred_responses(arrays["train"])
    data = sft_rows(chosen["prompts"], chosen["prompt_mask"], chosen["responses"][:, 0],
                    chosen["response_mask"][:, 0])
    params = train_lm(model, start, data, seed=cfg.seed, batch_size=cfg.batch_size,
                      steps=cfg.steps, optim=cfg.optim, run=run, prefix="sft",
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                      fsdp=cfg.fsdp)
    train_s = time.perf_counter() - t0

    # the test split's preferred responses: mean NLL per response token, before and after
    t_eval = time.perf_counter()
    test = preferred_responses(arrays["test"])
    tokens = float(test["response_mask"].sum())
    for name, p in (("nll_base", start), ("nll", params)):
        summary[f"sft/test_{name}"] = float(-precompute_logps(model, p, test).sum() / tokens)
    if cfg.export_hf:
        save_pretrained(cfg.export_hf, model, params, tokenizer=tok)
    summary.update({**final_metrics(run.path, "sft"),
                    "sft/test_response_tokens": int(tokens), "sft_examples": len(data["tokens"]),
                    "start": "init_from", "time_s/sft": train_s,
                    "time_s/sft_eval": time.perf_counter() - t_eval})
    run.write_summary(summary)
    return summary


def main(argv=None) -> dict:
    return cli.main(SFTConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
