"""One sweep engine: cells (a config for one experiment script) × seeds, each a resumable run
directory, one ``index.jsonl`` and one results table.

A *cell* is one experiment script (``experiments/<script>.py``) with one config; each cell × seed
runs into ``<out>/<cell>/seed<S>``: a finished run there (``summary.json``) is reused, an
interrupted one resumes from its checkpoint (the scripts resume), so a killed sweep continues where
it stopped — provided the directory was made for the same script and config (``sweep_cell.json``);
a directory of another config is an error naming the fields, before any run starts. After every finished run ``index.jsonl`` is rewritten (one row per finished run, in
sweep order: cell, overrides, seed, directory and the summary's headline numbers) and so is
``results.md`` (mean ± std over seeds per cell).

Overrides use the command line's dotted names (``{"ppo.kl-coef": 0.05}`` or ``ppo.kl_coef``) and
are parsed with tyro against the script's config class, every cell before any run starts: a bad
field name or value raises a ``ConfigError`` naming it. ``rlhf_jax.stages.compare`` (methods ×
seeds from one shared upstream) builds its cells itself and runs them here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import io
import itertools
import json
import re
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from rlhf_jax import scripts
from rlhf_jax.configs import ConfigError

# summary keys tabulated by default: final gold, KL and paired win rate of every policy
DEFAULT_METRICS = ("gold/*", "kl/*", "win_rate/*_vs_sft")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One config of one script; ``overrides`` are what the index records about it."""

    name: str
    script: str
    config: Any
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def config_class(script: str) -> type:
    """The config class of ``experiments/<script>.py``: the annotation of its ``run``'s ``cfg``."""
    run = scripts.load(script).run
    cls = typing.get_type_hints(run).get("cfg")
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"experiments/{script}.py: run(cfg, out) has no config-class annotation")
    return cls


def flags(config_cls: type, prefix: str = "") -> dict[str, type]:
    """Every command-line flag name of ``config_cls`` (dotted, hyphenated) → its field type."""
    out = {}
    for name, tp in typing.get_type_hints(config_cls).items():
        if name not in {f.name for f in dataclasses.fields(config_cls)}:
            continue
        flag = prefix + name.replace("_", "-")
        if dataclasses.is_dataclass(tp):
            out.update(flags(tp, flag + "."))
        else:
            out[flag] = tp
    return out


def _tokens(overrides: Mapping[str, Any], known: Mapping[str, type]) -> list[str]:
    """Command-line tokens of ``overrides`` (booleans as ``--flag`` / ``--no-flag``)."""
    tokens = []
    for name, value in overrides.items():
        flag = name.lstrip("-").replace("_", "-")
        if known.get(flag) is bool and isinstance(value, (bool, str)):
            on = value if isinstance(value, bool) else value.lower() in ("1", "true", "yes")
            if isinstance(value, str) and value.lower() not in ("1", "0", "true", "false", "yes",
                                                                 "no"):
                raise ConfigError(f"sweep override `{name}`: {value!r} is not a boolean")
            tokens.append(f"--{flag}" if on else f"--no-{flag}")
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        tokens += [f"--{flag}", *[str(v) for v in values]]
    return tokens


def apply_overrides(config_cls: type, overrides: Mapping[str, Any], base: Any = None) -> Any:
    """``base`` (default ``config_cls()``) with ``overrides`` (dotted flag names → values) parsed
    by tyro as the command line would; any bad name or value raises ``ConfigError`` naming it."""
    tokens = _tokens(overrides, flags(config_cls))
    return parse_tokens(config_cls, tokens, base, what=f"sweep overrides {dict(overrides)}")


def parse_tokens(config_cls: type, tokens: Sequence[str], base: Any = None, *,
                 what: str = "flags") -> Any:
    """``base`` with command-line ``tokens`` applied by tyro; a ``ConfigError`` (tyro's reason,
    naming the flag) instead of tyro's exit."""
    import tyro

    base = config_cls() if base is None else base
    known = flags(config_cls)
    for t in tokens:
        flag = t[2:].split("=", 1)[0]
        if t.startswith("--") and flag not in known and flag.removeprefix("no-") not in known:
            close = difflib.get_close_matches(flag, list(known), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ConfigError(f"{what}: `{t}`: {config_cls.__name__} has no such field{hint}")
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            return tyro.cli(config_cls, args=list(tokens), default=base)
    except SystemExit:
        text = " ".join(buf.getvalue().split())
        why = re.search(r"(Error parsing .*?)(?: -{3,}|$)", text)
        raise ConfigError(f"{what}: {why.group(1) if why else text[:300]}") from None


def grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of ``{name: [values…]}`` as a list of override dicts (in order)."""
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def cell_name(overrides: Mapping[str, Any]) -> str:
    """A directory name for a cell: ``name=value`` pairs joined by ``,`` (``base`` when none)."""
    if not overrides:
        return "base"
    parts = []
    for k, v in overrides.items():
        v = "-".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        parts.append(f"{k.lstrip('-')}={v}")
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))


def override_cells(script: str, cells: Iterable[Mapping[str, Any]], base: Any = None) -> list[Cell]:
    """Cells of one script from override dicts, every one parsed (and validated) up front."""
    cls = config_class(script)
    base = cls() if base is None else base
    if "seed" not in {f.name for f in dataclasses.fields(cls)}:
        raise ConfigError(f"experiments/{script}.py: {cls.__name__} has no `seed` field to sweep")
    out = [Cell(cell_name(o), script, apply_overrides(cls, o, base), dict(o)) for o in cells]
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep: two cells share a name: {names}")
    return out


def headline(summary: Mapping[str, Any], metrics: Sequence[str] = DEFAULT_METRICS) -> dict:
    """The summary's numbers whose keys match ``metrics`` (fnmatch patterns), in pattern order."""
    out = {}
    for pattern in metrics:
        for k in sorted(summary):
            if fnmatch.fnmatchcase(k, pattern) and isinstance(summary[k], (int, float)):
                out.setdefault(k, summary[k])
    return out


def _finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists()


CELL_FILE = "sweep_cell.json"   # the script and config a cell's run directory was made for


def _claim(cell: Cell, seed: int, run_dir: Path) -> dict:
    """The record of what ``run_dir`` runs; a ``ConfigError`` naming the cell and the differing
    fields if the directory already holds a run (finished or interrupted) of another script or
    config — it is never reused for, resumed into or overwritten by a different one. (Run
    directories from before this record existed carry none and are reused as they are; a field
    the config class gained since the record was written is no difference at its default, as
    for ``RunDir.write_config``.)"""
    from rlhf_jax.runs import _differences, _jsonable

    config = dataclasses.replace(cell.config, seed=seed)
    want = json.loads(json.dumps(_jsonable({"script": cell.script, "config": dataclasses.asdict(
        config)}), default=str))
    path = run_dir / CELL_FILE
    if path.exists():
        have = json.loads(path.read_text())
        diff = (_differences(have.get("script"), cell.script, "script")
                + _differences(have.get("config"), want["config"], "config.", config=config))
        if diff:
            raise ConfigError(f"cell {cell.name!r} seed {seed}: {run_dir} holds a run of another "
                              f"script or config (differing: {', '.join(diff)}); move it away or "
                              "choose another --out")
    return want


def run_cells(cells: Sequence[Cell], seeds: Sequence[int], out: str | Path, *,
              metrics: Sequence[str] = DEFAULT_METRICS,
              table: Callable[[Sequence[dict]], str] | None = None,
              on_run: Callable[[Cell, int, Path], None] | None = None) -> list[dict]:
    """Run every cell × seed (``cell.config`` with ``seed``) into ``out/<cell>/seed<S>`` (finished
    runs reused, interrupted ones resumed), rewriting ``out/index.jsonl`` and ``out/results.md``
    (``table(rows)``, default :func:`results_table`; ``None`` = leave results.md to the caller)
    after each; returns the index rows. ``on_run(cell, seed, dir)`` is called after each run.

    The cells run in this process, each building its own programs; JAX's persistent compilation
    cache is turned on here if it is not already (``rlhf_jax.launch``), so cells that differ only
    in traced scalars (PPO's ``rlhf_jax.rl.ppo.TRACED``, β, learning rates) compile once."""
    import jax

    from rlhf_jax import launch

    if not jax.config.jax_compilation_cache_dir:
        launch.enable_compilation_cache()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    claims = {(cell.name, seed): _claim(cell, seed, out / cell.name / f"seed{seed}")
              for cell in cells for seed in seeds}   # every cell checked before any work
    rows = []
    for cell in cells:
        for seed in seeds:
            run_dir = out / cell.name / f"seed{seed}"
            if not (run_dir / CELL_FILE).exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / f".{CELL_FILE}.tmp").write_text(json.dumps(claims[cell.name, seed]))
                (run_dir / f".{CELL_FILE}.tmp").replace(run_dir / CELL_FILE)
            if not _finished(run_dir):
                scripts.load(cell.script).run(dataclasses.replace(cell.config, seed=seed), run_dir)
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"cell": cell.name, "script": cell.script, "seed": seed,
                         "overrides": dict(cell.overrides), "dir": str(run_dir.resolve()),
                         **headline(summary, metrics)})
            write_index(out, rows, table)
            if on_run:
                on_run(cell, seed, run_dir)
    return rows


def write_index(out: Path, rows: Sequence[dict], table=None) -> None:
    """``index.jsonl`` and ``results.md`` (``table(rows)``) of the rows so far, each replaced
    atomically (a kill leaves the previous complete file)."""
    from rlhf_jax.runs import RunDir

    RunDir(out).write_jsonl("index.jsonl", rows)   # replaced in one rename
    if table is not None:
        tmp = out / ".results.md.tmp"
        tmp.write_text(table(rows))
        tmp.replace(out / "results.md")


def results_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per cell, mean ± std over its seeds of every headline number. A number
    over fewer seeds than the cell ran (a key some runs lack, or a non-finite value, which is
    left out) says over how many: ``1.500 ± 0.707 (n=2)``."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k not in ("cell", "script", "seed", "overrides", "dir")]
    lines = ["| cell | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name in dict.fromkeys(r["cell"] for r in rows):
        mine = [r for r in rows if r["cell"] == name]
        cells = []
        for k in keys:
            v = np.array([r[k] for r in mine if isinstance(r.get(k), (int, float))], np.float64)
            v = v[np.isfinite(v)]
            cell = ("—" if v.size == 0 else f"{v.mean():.3f}" if v.size == 1 else
                    f"{v.mean():.3f} ± {v.std(ddof=1):.3f}")
            cells.append(cell + (f" (n={v.size})" if 0 < v.size < len(mine) else ""))
        lines.append(f"| {name} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Attributes:
      script: the experiment script every cell runs (``experiments/<script>.py``).
      grid: axes of a grid, each ``name=v1,v2,…`` (a dotted flag of the script's config); the
        cells are their Cartesian product.
      cells: a list of cells, each ``name=value name2=value2`` (combined with ``grid`` if both).
      seeds: seeds every cell runs with.
      base: the script's own flags applied to every cell before its overrides (on the command
        line: everything after ``--``).
      metrics: summary keys (fnmatch patterns) recorded in ``index.jsonl`` and ``results.md``.
    """

    script: str = "ppo"
    grid: tuple[str, ...] = ()
    cells: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    base: tuple[str, ...] = ()
    metrics: tuple[str, ...] = DEFAULT_METRICS

    def __post_init__(self):
        from rlhf_jax.configs import check, check_numbers

        check_numbers(self)   # seeds in [0, 2**32)
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds",
              "must be one or more distinct seeds")
        for spec in (*self.grid, *[t for c in self.cells for t in c.split()]):
            check("=" in spec, "grid" if spec in self.grid else "cells",
                  f"{spec!r} is not name=value")


def sweep_cells(cfg: SweepConfig) -> list[Cell]:
    """Every cell of ``cfg``, parsed and validated against the script's config (no work run)."""
    cls = config_class(cfg.script)
    base = parse_tokens(cls, cfg.base, what=f"{cfg.script}.py base flags")
    listed = [dict(t.split("=", 1) for t in c.split()) for c in cfg.cells] or [{}]
    axes = {name: values.split(",") for name, values in (g.split("=", 1) for g in cfg.grid)}
    return override_cells(cfg.script, [{**c, **g} for c in listed for g in grid(axes)], base)
