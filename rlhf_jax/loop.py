"""The host-side training loop: it only feeds batches, logs, checkpoints and shows progress.

All numerical work is inside the jitted step. The loop resumes from the latest checkpoint of the
run directory: batches are a pure function of the step (``batch_at(step)``) and per-step keys are
``fold_in(key, step)``, so a resumed run replays exactly what an uninterrupted one would. Each
checkpoint also records the data position (the next step) and the stage key, and a resumed run
checks both.

Non-finite steps: the train step (``train.make_train_step``) leaves the state unchanged when its
loss or gradient is not finite and reports ``finite = 0``. The loop reads that flag one step late
(so the host never waits on the device in the steady state) and always before a checkpoint, so no
checkpoint ever holds a state after an unchecked step. ``on_nonfinite="stop"`` raises
:class:`NonFiniteError` naming the step and its metrics; ``"skip"`` counts the step
(``nonfinite_steps`` in the logged metrics) and goes on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from rlhf_jax import log_writers, progress
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.runs import RunDir

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """A train step produced a non-finite loss or gradient (the message names step and metrics)."""


def key_data(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key)).ravel().tolist()


class _FiniteWatch:
    """Checks each step's ``finite`` flag (``< 1``: an update was skipped; with ``all_finite``
    also any non-finite metric), one step late (or at once on ``flush``)."""

    def __init__(self, prefix: str, on_nonfinite: str, run: RunDir, finite_key: str,
                 all_finite: bool):
        self.prefix, self.mode, self.run = prefix, on_nonfinite, run
        self.finite_key, self.all_finite = finite_key, all_finite
        self.pending: tuple[int, dict] | None = None
        self.skipped = 0

    def push(self, step: int, metrics: dict) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        if self.all_finite:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            bad = sorted(k for k, v in host.items() if not np.isfinite(v))
        else:
            host, bad = None, []
        if self.finite_key in metrics and float(jax.device_get(metrics[self.finite_key])) < 1.0:
            bad.append(self.finite_key)
        if not bad:
            return
        if self.mode == "skip":
            self.skipped += 1
            return
        host = host or {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.run.write_json("nonfinite.json", {"stage": self.prefix, "step": step, **host})
        raise NonFiniteError(
            f"{self.prefix}: step {step} produced a non-finite loss or gradient "
            f"({', '.join(bad)}); its update was not applied and no checkpoint after step "
            f"{step - 1} was written. Metrics: "
            + ", ".join(f"{k}={v:.6g}" for k, v in sorted(host.items()))
            + " (set on_nonfinite='skip' in the stage's optimizer config to skip such steps)")


def fit(state: Any, step_fn: Callable, batch_at: Callable[[int], Any], *, steps: int,
        key: jax.Array, run: RunDir, prefix: str, log_every: int = 50,
        checkpoint_every: int = 0, ckpt: Checkpointer | None = None, desc: str | None = None,
        on_nonfinite: str = "stop",
        on_step: Callable[[int, Any], dict[str, float] | None] | None = None,
        on_log: Callable[[int, dict[str, float], Any], dict[str, float] | None] | None = None,
        key_prefix: str | None = None, finite_key: str = "finite", all_finite: bool = False,
        show: dict[str, str] | None = None,
        stop: Callable[[int, dict[str, float]], bool] | None = None) -> Any:
    """Run ``step_fn(state, batch_at(s), fold_in(key, s))`` for ``s`` from ``state.step`` to
    ``steps``; log metrics under ``prefix/`` every ``log_every`` steps and at the end; save a
    checkpoint (state + ``{"next_step", "key"}``) every ``checkpoint_every`` steps and at the end.

    ``step_fn`` returns ``(state, metrics)`` (a flat dict of scalars) or ``(state, metrics,
    aux)`` (e.g. PPO's rollout, read only by ``on_log``). Hooks:

    * ``on_step(done, state)`` runs after every step (``done`` = steps completed, before that
      step's checkpoint); a dict it returns (e.g. a periodic evaluation) is logged with the step's
      metrics at step ``done``. It must not keep ``state``: the next step donates it.
    * ``on_log(done, row, aux)`` runs on the host when a row is logged (``row``: the step's
      metrics as floats, keys as logged); a dict it returns joins the row (e.g. judging the
      samples in ``aux``).

    * ``stop(done, row)`` runs on every logged row (hooks' keys included); when it returns True
      the loop ends after that step: its checkpoint is saved with ``"stopped": True`` in the
      side-car, and a run resumed from that checkpoint does not train further (an early stop,
      e.g. at a KL budget, is as final as the last step).

    ``key_prefix``: prefix of the logged metric keys (default ``prefix/``; ``""`` for metrics that
    carry their own namespaces). The step counts as non-finite when ``metrics[finite_key] < 1``
    or, with ``all_finite``, any metric is not finite (see the module docstring). ``show``:
    progress label → logged key of the metrics shown beside the bar or line (default: the
    loss)."""
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    start = int(jax.device_get(state.step))
    kp = f"{prefix}/" if key_prefix is None else key_prefix
    show = {"loss": f"{kp}loss"} if show is None else show
    watch = _FiniteWatch(prefix, on_nonfinite, run, finite_key, all_finite)
    t0 = time.perf_counter()
    if ckpt is not None and start and ckpt.latest_step() == start and \
            ckpt.extra(start).get("stopped"):
        progress.message(f"{prefix}: stopped early at step {start} (checkpoint); not resumed")
        return state
    bar = progress.Progress(desc or prefix, steps, start)
    done = start
    try:
        for s in range(start, steps):
            state, metrics, *aux = step_fn(state, batch_at(s), jax.random.fold_in(key, s))
            done = s + 1
            watch.push(done, metrics)
            extra = on_step(done, state) if on_step is not None else None
            shown = {}
            if extra or done % log_every == 0 or done == steps:
                watch.flush()
                row = {f"{kp}{k}": float(v) for k, v in jax.device_get(metrics).items()}
                if on_nonfinite == "skip":
                    row[f"{prefix}/nonfinite_steps"] = float(watch.skipped)
                if on_log is not None:
                    row.update(on_log(done, row, aux[0] if aux else None) or {})
                row.update(extra or {})
                run.log_metrics(done, row)
                shown = {k: row[v] for k, v in show.items() if v in row}
                stopped = stop is not None and bool(stop(done, row))
            else:
                stopped = False
            if ckpt is not None and (stopped or done == steps
                                     or (checkpoint_every and done % checkpoint_every == 0)):
                watch.flush()
                ckpt.save(done, state, extra={"next_step": done, "key": key_data(key),
                                              **({"stopped": True} if stopped else {})})
            bar.update(done, **shown)
            if stopped:
                progress.message(f"{prefix}: stopped early after step {done} of {steps}")
                break
        watch.flush()
        jax.block_until_ready(state)
    finally:   # a save still in flight holds a checked state: let it land, also on an error
        if ckpt is not None:
            ckpt.wait()
    bar.close()
    run.log_timing(stage=prefix, steps=done - start, seconds=time.perf_counter() - t0)
    return state


def truncate_metrics(run: RunDir, step: int) -> None:
    """Drop ``metrics.jsonl`` rows logged after ``step`` (they will be logged again) and a last
    line cut short by a kill; the file is replaced in one rename, so a failure here loses no
    row. Any other line that is not JSON is refused, naming file and line, and nothing
    changes. The TensorBoard mirror follows (``log_writers.resume``; W&B cannot)."""
    path = run.path / "metrics.jsonl"
    if not run.writer:
        return
    if path.exists():
        _truncate_rows(path, step)
    log_writers.resume(run.path, step)


def _truncate_rows(path: Path, step: int) -> None:
    lines = path.read_text().splitlines()
    keep = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue              # the half-written last line of a killed run
            raise ValueError(f"{path}, line {i + 1}: not a JSON row ({e}); the run directory "
                             "was edited or damaged, fix or remove that line to resume") from e
        if row["step"] <= step:
            keep.append(line)
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(r + "\n" for r in keep))
    os.replace(tmp, path)


def resume(state: Any, ckpt: Checkpointer, run: RunDir, key: jax.Array | None = None, *,
           stage: str | None = None) -> Any:
    """The latest checkpoint's state (or ``state`` if none); metrics logged after it are dropped.
    With ``key``, a checkpoint written under another stage key (another seed) is refused. Every
    stage resumes here, and says so in one line (``stage`` names it; default: the run
    directory's name)."""
    step = ckpt.latest_step()
    if step is None:   # a start, or a rerun of a run killed before its first checkpoint
        truncate_metrics(run, 0)
        return state
    restored, extra = ckpt.restore(state, step)
    if key is not None and "key" in extra and extra["key"] != key_data(key):
        raise ValueError(f"{ckpt.directory}/{step}: checkpoint was written with another PRNG key "
                         "(another seed?); use a new run directory")
    if "next_step" in extra and extra["next_step"] != int(jax.device_get(restored.step)):
        raise ValueError(f"{ckpt.directory}/{step}: data position {extra['next_step']} does not "
                         f"match the state's step {int(jax.device_get(restored.step))}")
    truncate_metrics(run, step)
    progress.message(f"{stage or run.path.name}: resuming {run.path} from the checkpoint at step "
                     f"{step}; data position (next step {extra.get('next_step', step)}) and PRNG "
                     "key restored")
    return restored
