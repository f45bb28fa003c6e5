"""Optional mirrors of ``metrics.jsonl``: TensorBoard (``tensorboardX``, no TensorFlow) and
Weights & Biases. Off by default; ``RLHF_JAX_LOG_TO=tensorboard,wandb`` (or a script's ``--log-to
tensorboard,wandb``) turns them on. ``metrics.jsonl`` stays the canonical record: a mirror gets the
same numeric scalars at the same steps, and a failing mirror never stops a run.

TensorBoard events go to ``<run>/tensorboard/``; W&B runs to ``<run>/wandb/`` (project
``$WANDB_PROJECT``, default ``rlhf_jax``; ``WANDB_MODE=offline`` writes locally only), one W&B run
per run directory, resumed under the same id when the run directory resumes.

A run killed and resumed from its last checkpoint redoes the steps after it, and
``loop.truncate_metrics`` drops their rows from ``metrics.jsonl``; it calls :func:`resume`, so the
mirrors follow where they can. TensorBoard: the resumed process's event file starts with a purge
marker (tensorboardX ``purge_step``) that hides the killed process's events of the redone steps,
and replays from ``metrics.jsonl`` the rows up to the checkpoint that the killed process had not
flushed to disk; TensorBoard, and :func:`read_tensorboard`, then show each step once, as
``metrics.jsonl`` does. W&B is not rewound: only its server rewinds a run (``wandb.init(
resume_from="<id>?_step=N")``, a preview feature of W&B's cloud; offline it is only recorded for
``wandb sync``), so the W&B run keeps the killed process's rows of the redone steps (online, W&B
warns that the repeated steps are below its current step and ignores them; offline, each process
writes its own ``offline-run-*`` directory with its own rows, and ``wandb sync`` decides).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Mapping

ENV = "RLHF_JAX_LOG_TO"
WRITERS = ("tensorboard", "wandb")

_open: dict[tuple[str, Path], Any] = {}   # (writer, run dir) -> open writer
_failed: set[tuple[str, Path]] = set()


def enabled() -> tuple[str, ...]:
    """The writers ``$RLHF_JAX_LOG_TO`` names; a ``ValueError`` naming an unknown one."""
    names = tuple(n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip())
    for n in names:
        if n not in WRITERS:
            raise ValueError(f"{ENV}: unknown writer {n!r}; choose from {WRITERS}")
    return names


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics row (booleans and strings left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def resume(path: str | os.PathLike, step: int) -> None:
    """The run in ``path`` resumes after ``step``: its rows after ``step`` were dropped from
    ``metrics.jsonl`` (call this after) and will be logged again. The TensorBoard mirror, when on,
    gets a new writer (one already open is closed) whose event file hides the earlier files'
    events of later steps and replays the rows up to ``step`` those files lack (W&B: see the
    module docstring)."""
    path = Path(path)
    key = ("tensorboard", path)
    w = _open.pop(key, None)
    if w is not None:
        w.close()
    if "tensorboard" not in enabled() or key in _failed:
        return
    logdir, rows = path / "tensorboard", path / "metrics.jsonl"
    try:
        earlier = _event_files(logdir)
        if not (earlier or rows.exists()):
            return
        # The event files hold a prefix of the rows the earlier processes logged (a kill loses
        # the rows since the last flush, the last one maybe in part): from their last step, or
        # from the step after ``step`` if they reached further, the new file purges and replays.
        steps = [s for points in read_tensorboard(logdir).values() for s, _ in points]
        purge = min(max(steps, default=0), int(step) + 1)
        _open[key] = w = _tensorboard(path, purge_step=purge if earlier else None)
        for line in rows.read_text().splitlines() if rows.exists() else []:
            row = json.loads(line)
            if purge <= row["step"] <= step:
                _add_scalars(w, row["step"], scalars({k: v for k, v in row.items()
                                                      if k != "step"}))
    except Exception as e:   # the mirror stops; metrics.jsonl and the run go on
        _failed.add(key)
        warnings.warn(f"tensorboard logging for {path} stopped: {type(e).__name__}: {e}")


def _event_files(logdir: Path) -> list[Path]:
    return sorted(logdir.glob("events.out.tfevents.*")) if logdir.is_dir() else []


def _tensorboard(path: Path, purge_step: int | None = None):
    from tensorboardX import SummaryWriter

    # tensorboardX names a file by the second and host, and truncates an earlier file of that
    # name: a later file gets a suffix that also sorts it after the earlier ones
    n = len(_event_files(path / "tensorboard"))
    return SummaryWriter(logdir=str(path / "tensorboard"), flush_secs=10, purge_step=purge_step,
                         filename_suffix=f".{n:04d}" if n else "")


def _add_scalars(w, step: int, values: Mapping[str, float]) -> None:
    for k, v in values.items():
        w.add_scalar(k, v, global_step=int(step))


def _wandb(path: Path):
    import wandb

    for (kind, _), w in list(_open.items()):   # one W&B run per process at a time
        if kind == "wandb":
            w.finish()
            _open.pop((kind, _))
    cfg_file = path / "config.json"
    config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    run_id = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf_jax"), dir=str(path),
                      name=path.name, id=run_id, resume="allow", config=config,
                      reinit=True)


def write(path: Path, step: int, metrics: Mapping[str, Any]) -> None:
    """Mirror one metrics row to every enabled writer (a no-op when none is)."""
    names = enabled()
    if not names:
        return
    values = scalars(metrics)
    for name in names:
        key = (name, Path(path))
        if key in _failed:
            continue
        try:
            if key not in _open:
                _open[key] = _tensorboard(key[1]) if name == "tensorboard" else _wandb(key[1])
            w = _open[key]
            if name == "tensorboard":
                _add_scalars(w, step, values)
            else:
                w.log(values, step=int(step))
        except Exception as e:   # the mirror stops; metrics.jsonl and the run go on
            _failed.add(key)
            warnings.warn(f"{name} logging for {path} stopped: {type(e).__name__}: {e}")


def read_tensorboard(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``path`` as ``{tag: [(step, value), …]}`` (the
    TFRecord framing read directly, with tensorboardX's protobuf; no TensorFlow), as TensorBoard
    shows them: the files of a directory (one TensorBoard run) in name order, and a restart's purge
    applied as TensorBoard's ``EventAccumulator`` does (after a ``brain.Event:2`` file version, a
    ``SessionLog.START`` event at step ``s`` drops the events read before it with step ≥ ``s``;
    in files without a version, a summary at a step ``s`` below the latest step drops the earlier
    events of its tags with step ≥ ``s``). A record cut short by a kill ends its file."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(Path(path).rglob("events.out.tfevents.*"))
    for directory in sorted({f.parent for f in files}):
        kept: list[tuple[str, int, float]] = []
        version, latest = None, -1
        for f in (f for f in files if f.parent == directory):
            data, pos = f.read_bytes(), 0
            while pos + 12 <= len(data):
                (n,) = struct.unpack("<Q", data[pos:pos + 8])
                if pos + 12 + n + 4 > len(data):
                    break
                event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
                pos += 12 + n + 4
                if event.HasField("file_version"):
                    version = _file_version(event.file_version)
                if version is not None and version >= 2:
                    if (event.HasField("session_log")
                            and event.session_log.status == event_pb2.SessionLog.START):
                        kept = [x for x in kept if x[1] < event.step]
                elif event.HasField("summary") and event.step < latest:
                    tags = {v.tag for v in event.summary.value}
                    kept = [x for x in kept if x[0] not in tags or x[1] < event.step]
                else:
                    latest = event.step
                kept += [(v.tag, int(event.step), float(v.simple_value))
                         for v in event.summary.value if v.HasField("simple_value")]
        for tag, step, value in kept:
            out.setdefault(tag, []).append((step, value))
    return out


def _file_version(text: str) -> float:
    """``brain.Event:2`` → 2.0 (TensorBoard's ``ParseFileVersion``; -1 when unparsable)."""
    try:
        return float(text.split(":")[-1])
    except ValueError:
        return -1.0


def close() -> None:
    """Flush and close every open writer (also run at exit)."""
    while _open:
        (kind, _), w = _open.popitem()
        w.close() if kind == "tensorboard" else w.finish()


atexit.register(close)
