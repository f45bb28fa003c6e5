"""Pretrain the base model on the task's corpus (stage 0): next-token loss on packed documents.

With ``--init-from DIR`` the base model is a Hugging Face checkpoint instead of a random
initialisation; ``--steps`` then continue pretraining on the task (0 = use it as it is).

    python experiments/pretrain.py --out runs/pretrain      # default config
    python experiments/pretrain.py --help                  # every option
"""

from rlhf_jax import launch

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

import time
from pathlib import Path

from rlhf_jax import cli
from rlhf_jax.checkpoint import save_params
from rlhf_jax.data.batching import pack_documents
from rlhf_jax.evaluate import evaluate_heldout
from rlhf_jax.models.functional import count_params
from rlhf_jax.parallel import check_divisible, make_mesh
from rlhf_jax.runs import RunDir
from rlhf_jax.stages.common import eval_key, pipeline_task
from rlhf_jax.stages.lm import PretrainConfig, base_model, knowledge, train_lm


def run(cfg: PretrainConfig, out: str | Path) -> dict:
    """Pretrain (or import and continue) into run directory ``out``; returns its summary."""
    check_divisible(cfg.batch_size, make_mesh(), "batch_size")
    t0 = time.perf_counter()
    task = pipeline_task(cfg)
    cfg, model, params, meta = base_model(cfg, task)    # random init, or cfg.init_from
    run = RunDir(out)
    run.write_config(cfg)
    run.write_meta(seed=cfg.seed, extra=meta)
    run.write_json("tokenizer.json", task.tokenizer.to_json())

    data = pack_documents(task.tokenizer, task.pretraining_corpus(), cfg.seq_len)
    if cfg.steps:
        params = train_lm(model, params, data, seed=cfg.seed, batch_size=cfg.batch_size,
                          steps=cfg.steps, optim=cfg.optim, run=run, prefix="pretrain",
                          log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                          fsdp=cfg.fsdp)
    else:
        save_params(run.path / "params", params)
    train_s = time.perf_counter() - t0

    held_out, _ = evaluate_heldout(model, params, task, cfg.task, eval_key(cfg.seed), run=run,
                                   name="base")
    summary = {"params": count_params(params), "corpus_tokens": int(data["attention_mask"].sum()),
               **knowledge(model, params, task, cfg.task.prompt_len, "base"), **held_out,
               "time_s/pretrain": train_s}
    run.write_summary(summary)
    return summary


def main(argv=None) -> dict:
    return cli.main(PretrainConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
