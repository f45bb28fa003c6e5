"""Run directories: config, metadata, metrics (JSONL), timings, summary — what notebooks read.

Layout of a run directory::

    config.json      resolved config of the stage
    meta.json        library / JAX versions, devices, seed, git commit, command line
    metrics.jsonl    one JSON object per logged step; no wall-clock fields, so two runs with the
                     same config and seed can be compared line by line
    timings.jsonl    wall-clock figures (seconds), kept apart from metrics
    summary.json     final figures of the stage (held-out gold metrics, time per stage)
    checkpoints/     Orbax checkpoints (see rlhf_jax.checkpoint)
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

import rlhf_jax
from rlhf_jax.configs import ConfigError


def _jsonable(v: Any) -> Any:
    """Plain JSON values: arrays to lists/scalars, non-finite floats to strings ('nan', 'inf')."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
        v = np.asarray(v)
        if v.ndim:
            return [_jsonable(x) for x in v.tolist()]
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two JSON trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "<root>"]


class RunDir:
    """One experiment's run directory. Only process 0 writes (multi-host safe)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.writer = jax.process_index() == 0
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)

    def _write_json(self, name: str, obj: Any) -> None:
        if self.writer:
            tmp = self.path / f".{name}.tmp"
            tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=False,
                                      default=str) + "\n")
            os.replace(tmp, self.path / name)

    def _append(self, name: str, obj: Mapping[str, Any]) -> None:
        if self.writer:
            with open(self.path / name, "a") as f:
                f.write(json.dumps(_jsonable(obj), sort_keys=True, allow_nan=False) + "\n")

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config.json``; resuming a run directory under a different config is refused
        (with the differing fields named) before anything is overwritten."""
        path = self.path / "config.json"
        if path.exists():
            old = json.loads(path.read_text())
            new = json.loads(json.dumps(_jsonable(config), default=str))
            diff = _differences(old, new)
            if diff:
                raise ConfigError(
                    f"{path} holds a different config; differing fields: {', '.join(diff[:10])}"
                    " — use a new run directory (or the same options) to resume")
        self._write_json("config.json", config)

    def write_meta(self, *, seed: int, extra: Mapping[str, Any] | None = None) -> None:
        self._write_json("meta.json", {
            "rlhf_jax_version": rlhf_jax.__version__, "jax_version": jax.__version__,
            "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
            "python": platform.python_version(), "seed": seed, "git_commit": _git_commit(),
            "argv": sys.argv, **(extra or {})})

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._append("metrics.jsonl", {"step": int(step), **metrics})

    def log_timing(self, **fields: Any) -> None:
        self._append("timings.jsonl", {"time": time.time(), **fields})

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self._write_json("summary.json", dict(summary))

    def read_summary(self) -> dict:
        return json.loads((self.path / "summary.json").read_text())

    def write_json(self, name: str, obj: Any) -> None:
        self._write_json(name, obj)

    def write_jsonl(self, name: str, rows) -> None:
        if self.writer:
            with open(self.path / name, "w") as f:
                for r in rows:
                    f.write(json.dumps(_jsonable(r), sort_keys=True, allow_nan=False,
                                       default=str) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a run's ``metrics.jsonl``."""
    with open(Path(path) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
