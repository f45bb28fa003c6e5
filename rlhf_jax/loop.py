"""The host-side training loop: it only feeds batches, logs, checkpoints and shows progress.

All numerical work is inside the jitted step. The loop resumes from the latest checkpoint of the
run directory: batches are a pure function of the step (``batch_at(step)``) and per-step keys are
``fold_in(key, step)``, so a resumed run replays exactly what an uninterrupted one would.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
from tqdm.auto import tqdm

from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.runs import RunDir


def fit(state: Any, step_fn: Callable, batch_at: Callable[[int], Any], *, steps: int,
        key: jax.Array, run: RunDir, prefix: str, log_every: int = 50,
        checkpoint_every: int = 0, ckpt: Checkpointer | None = None, desc: str | None = None
        ) -> Any:
    """Run ``step_fn(state, batch_at(s), fold_in(key, s))`` for ``s`` from ``state.step`` to
    ``steps``; log metrics under ``prefix/`` every ``log_every`` steps and at the end; save a
    checkpoint every ``checkpoint_every`` steps and at the end."""
    start = int(jax.device_get(state.step))
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), desc=desc or prefix, initial=start, total=steps,
               disable=None, dynamic_ncols=True, leave=False)
    for s in bar:
        state, metrics = step_fn(state, batch_at(s), jax.random.fold_in(key, s))
        done = s + 1
        if done % log_every == 0 or done == steps:
            host = jax.device_get(metrics)
            run.log_metrics(done, {f"{prefix}/{k}": float(v) for k, v in host.items()})
            bar.set_postfix(loss=f"{float(host.get('loss', float('nan'))):.4f}")
        if ckpt is not None and (done == steps or (checkpoint_every and done % checkpoint_every == 0)):
            ckpt.save(done, state)
    jax.block_until_ready(state)
    run.log_timing(stage=prefix, steps=steps - start, seconds=time.perf_counter() - t0)
    if ckpt is not None:
        ckpt.wait()
    return state


def resume(state: Any, ckpt: Checkpointer, run: RunDir) -> Any:
    """The latest checkpoint's state (or ``state`` if none); metrics logged after it are dropped."""
    step = ckpt.latest_step()
    if step is None:
        return state
    restored, _ = ckpt.restore(state, step)
    path = run.path / "metrics.jsonl"
    if run.writer and path.exists():
        import json

        rows = [r for r in path.read_text().splitlines()
                if r.strip() and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
    return restored
