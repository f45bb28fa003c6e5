"""Run directories: config, metadata, metrics (JSONL), timings, summary — what notebooks read
(``load_run`` / ``load_sweep`` / ``load``: plain dicts and NumPy arrays, optional ``to_pandas()``).

Layout of a run directory::

    config.json      resolved config of the stage
    meta.json        library / JAX versions, devices, seed, git commit, command line
    metrics.jsonl    one JSON object per logged step; no wall-clock fields, so two runs with the
                     same config and seed can be compared line by line
    timings.jsonl    wall-clock figures (seconds), kept apart from metrics
    summary.json     final figures of the stage (held-out gold metrics, time per stage)
    samples_<policy>.jsonl   held-out responses of each evaluated policy, judged
    samples/iter_<i>.jsonl   a few judged rollout samples of each logged iteration (online RL)
    checkpoints/     Orbax checkpoints (see rlhf_jax.checkpoint)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

import rlhf_jax
from rlhf_jax import log_writers, progress
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


def _git(*args: str) -> str | None:
    """A git command's output in the package's checkout (None outside one)."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except Exception:
        return None


def _git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from ``git_commit`` (the run's code is not that commit's)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


_NO_DEFAULT = object()


def _field_default(obj: Any, key: str) -> Any:
    """The JSON form of dataclass ``obj``'s field ``key``'s default (``_NO_DEFAULT`` without
    one, or when ``obj`` is not a dataclass)."""
    if not dataclasses.is_dataclass(obj):
        return _NO_DEFAULT
    f = {f.name: f for f in dataclasses.fields(obj)}.get(key)
    if f is None or (f.default is dataclasses.MISSING and
                     f.default_factory is dataclasses.MISSING):
        return _NO_DEFAULT
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return json.loads(json.dumps(_jsonable(value), default=str))


def _differences(a: Any, b: Any, prefix: str = "", config: Any = None) -> list[str]:
    """Dotted names of the fields that differ between two JSON trees (``a`` stored, ``b`` new).
    With ``config``, the dataclass ``b`` was written from, a field absent from ``a`` whose new
    value is the field's default is no difference: the run predates the field."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a and k in b and _field_default(config, k) == b[k]:
                continue
            child = getattr(config, k, None) if dataclasses.is_dataclass(config) else None
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.", child)
        return out
    name = prefix.rstrip(".")
    return [] if a == b or _same_path(name, a, b) else [name or "<root>"]


def _same_path(name: str, a: Any, b: Any) -> bool:
    """Whether two values of a path field (``*_dir``, ``init_from``) name the same file from the
    current directory: ``--out runs/x`` and ``--out $PWD/runs/x`` are one run, not two configs."""
    path_field = name.rpartition(".")[2].endswith("_dir") or name.endswith("init_from")
    return (path_field and isinstance(a, str) and isinstance(b, str) and bool(a) and bool(b)
            and os.path.realpath(a) == os.path.realpath(b))


def read_config_json(path: Path) -> dict:
    """A run directory's ``config.json`` (or ``meta.json``); an unreadable one is an error
    naming the file."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON config ({e}); the run directory was edited or "
                          "damaged") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return config


def config_differences(stored: dict, config: Any) -> list[str]:
    """Dotted names of the fields where ``config`` (a config dataclass, or a mapping) differs
    from a stored ``config.json``; a field the dataclass gained since is no difference at its
    default."""
    cfg = config if dataclasses.is_dataclass(config) else None
    new = json.loads(json.dumps(_jsonable(dataclasses.asdict(cfg) if cfg else config),
                                default=str))
    return _differences(stored, new, config=cfg)


# meta.json entries whose file digests a rerun must match: entry -> key of its digests
INPUT_DIGESTS = {"init_from": "files", "data": "files"}


LOCK_FILE = ".lock"   # held (flock) by the process writing a run directory: RunDir.lock
_LOCKS: dict[Path, Any] = {}   # run directory -> the open lock file this process holds


@contextlib.contextmanager
def run_locks():
    """Release, at the end of the block, the run directory locks taken in it (a stage run from
    a script or a notebook: its directories are free for another process once it returned)."""
    before = set(_LOCKS)
    try:
        yield
    finally:
        for key in [k for k in _LOCKS if k not in before]:
            _LOCKS.pop(key).close()


TFDS_PARTIAL = "incomplete."   # a TFDS build in progress (renamed into place when complete)
# records written before a run's work begins (see RunDir.started); sweep_cell.json is a sweep
# cell's claim on its directory (rlhf_jax.sweep.CELL_FILE), written before the cell's run starts
START_FILES = frozenset({"config.json", "meta.json", "tokenizer.json", "sweep_cell.json"})


class RunDir:
    """One experiment's run directory. Only process 0 writes (multi-host safe)."""

    def __init__(self, path: str | os.PathLike, *, upstream: Sequence[str | os.PathLike] = ()):
        """``upstream``: finished runs the stage starts from (``stages.common.upstream_run``,
        which checks them against the command); inside ``path`` they are not the stage's own
        work (:meth:`started`)."""
        self.path = Path(path)
        self.upstream = tuple(Path(u).resolve() for u in upstream)
        self.writer = jax.process_index() == 0
        if self.writer:
            if self.path.exists() and not self.path.is_dir():
                raise ConfigError(f"{self.path}: not a directory; a run directory (--out) must "
                                  "be a new or existing directory")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as e:   # a parent is a file
                raise ConfigError(f"{self.path}: cannot be a run directory ({e})") from None

    def lock(self) -> None:
        """Claim the run directory for this process (an exclusive ``flock`` on its ``.lock``,
        held until the :func:`run_locks` block around the stage ends or the process
        ends, even by ``kill -9``): a second process on the same directory would
        otherwise remove the first one's checkpoint save in progress (as a killed save's) and
        append to the same ``metrics.jsonl``."""
        key = self.path.resolve()
        if not self.writer or key in _LOCKS:
            return
        f = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise ConfigError(f"{self.path}: another process (pid {holder}) is running in this "
                              "run directory; wait for it to end (then rerun to resume), or "
                              "use another --out") from None
        except OSError as e:   # a file system without locks (some network or FUSE mounts)
            f.close()
            progress.message(f"warning: {self.path}: cannot lock the run directory ({e}); "
                             "make sure no other process writes to it")
            return
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _LOCKS[key] = f

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

    def started(self) -> bool:
        """Whether the run directory holds anything a run computed: any file but the records
        written before the work begins (:data:`START_FILES`, in it or a stage's subdirectory;
        the ``upstream`` runs it reuses excepted). A run that stopped before that (a config or
        input file it refused at run time) is started afresh: its ``config.json`` and
        ``meta.json`` are replaced, not resumed. A symbolic link counts as work (the walk does
        not follow links, such as ``checkpoints`` linked to scratch space); a data set build
        that was killed (TFDS's ``incomplete.*`` directory, never read: the next build starts
        anew) does not."""
        for root, dirs, files in os.walk(self.path):
            here = Path(root)
            dirs[:] = [d for d in dirs if (here / d).resolve() not in self.upstream
                       and not d.startswith(TFDS_PARTIAL)]
            if any((here / d).is_symlink() for d in dirs):
                return True
            if any(f not in START_FILES and not f.startswith(".") for f in files):
                return True
        return False

    def write_config(self, config: Any, *, may_change: frozenset[str] = frozenset()
                     ) -> list[str]:
        """Write ``config.json`` (a config dataclass, or a mapping); resuming a run directory
        under a different config is refused (with the differing fields named) before anything
        is overwritten, unless every differing field is in ``may_change`` (then returned), or
        the run has not :meth:`started` (then it starts afresh under the new config). A field
        the dataclass gained after the run was written is no difference at its default."""
        self.lock()
        cfg = config if dataclasses.is_dataclass(config) else None
        if cfg is not None:
            config = dataclasses.asdict(cfg)
        path = self.path / "config.json"
        fresh = not path.exists() or not self.started()
        diff = [] if fresh else config_differences(read_config_json(path), cfg or config)
        if not set(diff) <= may_change:
            raise ConfigError(
                f"{path} holds a different config; differing fields: {', '.join(diff[:10])}"
                " — use a new run directory (or the same options) to resume")
        self._write_json("config.json", config)
        return diff

    def write_meta(self, *, seed: int, extra: Mapping[str, Any] | None = None) -> None:
        """Write ``meta.json``: versions, devices, seed, commit, argv and ``extra`` (e.g. the
        digests of the input files a run reads). A rerun keeps the record of the run's start and
        appends its own versions, devices, commit and argv to ``"resumed"``; input files whose
        digests differ from the recorded ones (:data:`INPUT_DIGESTS`) are refused first."""
        meta = {"rlhf_jax_version": rlhf_jax.__version__, "jax_version": jax.__version__,
                "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
                "python": platform.python_version(), "seed": seed, "git_commit": _git_commit(),
                "git_dirty": _git_dirty(), "argv": sys.argv, **(extra or {})}
        path = self.path / "meta.json"
        if path.exists() and self.started():
            old = _revive(read_config_json(path))   # a damaged one is named, not a traceback
            for key, digests in INPUT_DIGESTS.items():
                was, now = (old.get(key) or {}).get(digests), (meta.get(key) or {}).get(digests)
                if was is not None and was != now:
                    now = now or {}
                    names = sorted(n for n in {*was, *now} if was.get(n) != now.get(n))
                    raise ConfigError(
                        f"{path}: {key} files changed since the run started ({', '.join(names)};"
                        " sha256 recorded there) — resuming on other inputs would mix two runs: "
                        "use a new run directory")
            meta = {**old, "resumed": [*old.get("resumed", []), {
                k: meta[k] for k in ("rlhf_jax_version", "jax_version", "devices",
                                     "process_count", "git_commit", "git_dirty", "argv")}]}
        self._write_json("meta.json", meta)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append a row to ``metrics.jsonl`` (and mirror it to TensorBoard / W&B when
        ``$RLHF_JAX_LOG_TO`` names them: :mod:`rlhf_jax.log_writers`)."""
        self._append("metrics.jsonl", {"step": int(step), **metrics})
        if self.writer:
            log_writers.write(self.path, step, _jsonable(metrics))

    def log_timing(self, **fields: Any) -> None:
        self._append("timings.jsonl", {"time": time.time(), **fields})

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self._write_json("summary.json", dict(summary))

    def read_summary(self) -> dict:
        return json.loads((self.path / "summary.json").read_text())

    def write_json(self, name: str, obj: Any) -> None:
        self._write_json(name, obj)

    def write_jsonl(self, name: str, rows) -> None:
        """Write JSON-lines file ``name`` in one rename: a kill mid-write (e.g. while a finished
        run's evaluation is redone) leaves the previous complete file, never a truncated one."""
        if self.writer:
            path = self.path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w") as f:
                for r in rows:
                    f.write(json.dumps(_jsonable(r), sort_keys=True, allow_nan=False,
                                       default=str) + "\n")
            os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a run's ``metrics.jsonl``."""
    with open(Path(path) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def final_metrics(path: str | os.PathLike, prefix: str) -> dict:
    """``final/<prefix>/…``: the ``<prefix>/…`` entries of the last training row (the last with
    ``<prefix>/loss``) of a run's ``metrics.jsonl`` (empty without one)."""
    rows = [r for r in read_metrics(path) if f"{prefix}/loss" in r]
    return {f"final/{k}": v for k, v in (rows[-1] if rows else {}).items()
            if k.startswith(f"{prefix}/")}


ITERATION_SAMPLES = "samples"   # <run>/samples/iter_<iteration>.jsonl
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _revive(v: Any) -> Any:
    """Undo ``_jsonable``'s spelling of non-finite floats ('nan', 'inf', '-inf')."""
    if isinstance(v, str) and v in NONFINITE:
        return NONFINITE[v]
    if isinstance(v, dict):
        return {k: _revive(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_revive(x) for x in v]
    return v


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every row of a JSON-lines file, non-finite floats restored ([] when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path) as f:
        return [_revive(json.loads(line)) for line in f if line.strip()]


def _read_json(path: Path) -> dict:
    return _revive(json.loads(path.read_text())) if path.exists() else {}


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows → one array per key (float64 with NaN where a row lacks a number; else object)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
               for v in vals):
            out[k] = np.array([math.nan if v is None else v for v in vals], np.float64)
        else:
            out[k] = np.array(vals, dtype=object)
    return out


def _pandas(columns: dict[str, np.ndarray]):
    import pandas as pd

    return pd.DataFrame(columns)


@dataclasses.dataclass
class Run:
    """One run directory read into plain structures (``summary`` is ``{}`` while unfinished)."""

    path: Path
    config: dict
    meta: dict
    summary: dict
    metrics: list[dict]
    timings: list[dict]

    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").exists()

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the metrics rows that hold ``key``."""
        rows = [r for r in self.metrics if key in r]
        return (np.array([r["step"] for r in rows], np.int64),
                np.array([r[key] for r in rows], np.float64))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every metric as a column over all metrics rows (``step`` first; NaN where absent)."""
        return _columns(self.metrics)

    def sample_names(self) -> list[str]:
        """The policies with a ``samples_<name>.jsonl`` (e.g. ``sft``, ``rlhf``, ``best_of_n``)."""
        return sorted(p.name[len("samples_"):-len(".jsonl")]
                      for p in self.path.glob("samples_*.jsonl"))

    def samples(self, name: str) -> list[dict]:
        """Rows of ``samples_<name>.jsonl`` (held-out responses with their gold labels)."""
        path = self.path / f"samples_{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such samples file; have {self.sample_names()}")
        return read_jsonl(path)

    def iteration_samples(self, iteration: int | None = None) -> list[dict]:
        """Judged rollout samples written at logged iterations (``samples/iter_<i>.jsonl``: a few
        per iteration, each with ``iteration``, ``prompt``, ``response``, ``label``, ``gold``,
        ``rm_score``), in iteration order; only ``iteration``'s with one given ([] if none)."""
        files = sorted((self.path / ITERATION_SAMPLES).glob("iter_*.jsonl"))
        if iteration is not None:
            files = [f for f in files if f.name == f"iter_{iteration:04d}.jsonl"]
        return [r for f in files for r in read_jsonl(f)]

    def to_pandas(self):
        """The metrics as a ``pandas.DataFrame`` (one row per logged step; needs pandas)."""
        return _pandas(self.arrays())


def load_run(path: str | os.PathLike) -> Run:
    """A run directory's config, meta, summary, metrics and timings."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a run directory (no config.json)")
    return Run(path, _read_json(path / "config.json"), _read_json(path / "meta.json"),
               _read_json(path / "summary.json"), read_jsonl(path / "metrics.jsonl"),
               read_jsonl(path / "timings.jsonl"))


@dataclasses.dataclass
class Sweep:
    """A sweep directory (``rlhf_jax.sweep``): its ``index.jsonl`` rows, one per finished run."""

    path: Path
    config: dict
    index: list[dict]

    def runs(self) -> list[Run]:
        """Every finished run of the index, in sweep order."""
        return [load_run(r["dir"]) for r in self.index]

    def run(self, cell: str, seed: int) -> Run:
        for r in self.index:
            if r["cell"] == cell and r["seed"] == seed:
                return load_run(r["dir"])
        raise KeyError(f"{self.path}: no finished run of cell {cell!r}, seed {seed}")

    def arrays(self) -> dict[str, np.ndarray]:
        """The index as columns; each override as a column ``override/<name>``, numbers where
        every value of the override reads as one (the command line gave them as text)."""
        flat = [{**{k: v for k, v in r.items() if k != "overrides"},
                 **{f"override/{k}": v for k, v in r.get("overrides", {}).items()}}
                for r in self.index]
        cols = _columns(flat)
        for k, col in cols.items():
            if k.startswith("override/") and col.dtype == object:
                try:
                    cols[k] = np.array([math.nan if v is None else float(v) for v in col])
                except (TypeError, ValueError):
                    pass                  # a non-numeric override (a name, a flag) stays text
        return cols

    def to_pandas(self):
        """The index as a ``pandas.DataFrame`` (one row per cell × seed; needs pandas)."""
        return _pandas(self.arrays())


def load_sweep(path: str | os.PathLike) -> Sweep:
    path = Path(path)
    if not (path / "index.jsonl").exists():
        raise FileNotFoundError(f"{path}: not a sweep directory (no index.jsonl)")
    return Sweep(path, _read_json(path / "config.json"), read_jsonl(path / "index.jsonl"))


def load(path: str | os.PathLike) -> Run | Sweep:
    """A sweep (a directory with ``index.jsonl``) or a single run."""
    return load_sweep(path) if (Path(path) / "index.jsonl").exists() else load_run(path)
