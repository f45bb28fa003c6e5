"""Optional mirrors of ``metrics.jsonl``: TensorBoard (``tensorboardX``, no TensorFlow) and
Weights & Biases. Off by default; ``RLHF_JAX_LOG_TO=tensorboard,wandb`` (or a script's ``--log-to
tensorboard,wandb``) turns them on. ``metrics.jsonl`` stays the canonical record: a mirror gets the
same numeric scalars at the same steps, and a failing mirror never stops a run.

TensorBoard events go to ``<run>/tensorboard/``; W&B runs to ``<run>/wandb/`` (project
``$WANDB_PROJECT``, default ``rlhf_jax``; ``WANDB_MODE=offline`` writes locally only), one W&B run
per run directory, resumed under the same id when the run directory resumes.
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


def _tensorboard(path: Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=str(path / "tensorboard"), flush_secs=10)


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
                for k, v in values.items():
                    w.add_scalar(k, v, global_step=int(step))
            else:
                w.log(values, step=int(step))
        except Exception as e:   # the mirror stops; metrics.jsonl and the run go on
            _failed.add(key)
            warnings.warn(f"{name} logging for {path} stopped: {type(e).__name__}: {e}")


def read_tensorboard(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``path`` as ``{tag: [(step, value), …]}`` (the
    TFRecord framing read directly, with tensorboardX's protobuf; no TensorFlow)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(path).rglob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out


def close() -> None:
    """Flush and close every open writer (also run at exit)."""
    while _open:
        (kind, _), w = _open.popitem()
        w.close() if kind == "tensorboard" else w.finish()


atexit.register(close)
