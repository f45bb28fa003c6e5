"""The README's results, from committed files: ``results/<set>/seed<S>/`` holds the
``summary.json``, ``config.json``, ``meta.json`` and (trimmed) held-out sample files of the runs a README table
reports, and the table between ``<!-- results:<set>:start -->`` and ``<!-- results:<set>:end -->``
is rendered from them (never typed by hand); ``tests/test_results.py`` checks they agree.

    python -m rlhf_jax.results collect /work/runs/s2-pipe-seed0 /work/runs/s2-pipe-seed1 \
        /work/runs/s2-pipe-seed2 --dest results/pipeline
    python -m rlhf_jax.results update-readme      # re-render every marked table in README.md
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
SAMPLES = ("sft", "rlhf", "best_of_n")
PROMPTS_KEPT = 48   # held-out prompts whose samples are committed (all their samples)
POLICIES = (  # (row label, summary name, KL cell)
    ("base (pretrained only)", "base", None),
    ("SFT", "sft", "0"),
    ("best-of-4 (SFT samples, RM reranks)", "best_of_n", "kl/best_of_n"),
    ("**RLHF (PPO)**", "rlhf", "kl/rlhf_vs_sft"),
)
METRICS = ("gold", "fabrication_rate", "accuracy", "unknown_rate")


def _seed_dirs(results_dir: Path) -> list[Path]:
    dirs = sorted(results_dir.glob("seed*"), key=lambda p: int(p.name[4:]))
    return [d for d in dirs if (d / "summary.json").exists()]


def collect(run_dirs: Sequence[str | Path], dest: str | Path,
            prompts: int = PROMPTS_KEPT) -> list[Path]:
    """Copy each run's summary, config, meta and the samples of its first ``prompts`` held-out
    prompts (uid order) into ``dest/seed<S>`` (S = the run's seed). A pipeline directory's
    samples and config are read from its ``ppo/`` stage."""
    out = []
    for run in map(Path, run_dirs):
        if not (run / "summary.json").exists():
            raise FileNotFoundError(f"{run}: no finished run (no summary.json)")
        stage = run / "ppo" if (run / "ppo" / "summary.json").exists() else run
        seed = json.loads((run / "meta.json").read_text())["seed"]
        target = Path(dest) / f"seed{seed}"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "summary.json", target / "summary.json")
        for name in ("config.json", "meta.json"):
            shutil.copy(stage / name, target / name)
        for name in SAMPLES:
            src = stage / f"samples_{name}.jsonl"
            if src.exists():
                rows = [json.loads(line) for line in src.read_text().splitlines() if line]
                keep = sorted({r["uid"] for r in rows})[:prompts]
                (target / src.name).write_text("".join(
                    json.dumps(r, sort_keys=True) + "\n" for r in rows if r["uid"] in keep))
        out.append(target)
    return out


def _cell(values: list[float]) -> str:
    v = np.asarray(values, np.float64)
    text = f"{v.mean():.3f}" if v.size == 1 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"
    return text.replace("-", "−")


def pipeline_table(results_dir: str | Path) -> str:
    """The main results table (held-out metrics of base, SFT, best-of-4 and RLHF; mean ± std over
    the committed seeds) and the paired RLHF-vs-SFT line, from ``results_dir/seed*/``."""
    runs = [json.loads((d / "summary.json").read_text()) for d in _seed_dirs(Path(results_dir))]
    if not runs:
        raise FileNotFoundError(f"{results_dir}: no seed*/summary.json to render")
    seeds = ", ".join(d.name[4:] for d in _seed_dirs(Path(results_dir)))
    where = Path(results_dir).resolve()
    where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
    lines = [f"Seeds {seeds} (files in `{where}/`; rendered by "
             "`python -m rlhf_jax.results update-readme`):", "",
             "| policy | gold | fabrication rate | accuracy (real people) | unknown rate "
             "| KL to SFT (nats/seq) |", "|---|---|---|---|---|---|"]
    for label, name, kl in POLICIES:
        cells = [_cell([r[f"{m}/{name}"] for r in runs]) if f"{m}/{name}" in runs[0] else "—"
                 for m in METRICS]
        kl_cell = "—" if kl is None else kl if kl == "0" else _cell([r[kl] for r in runs])
        bold = label.startswith("**")
        row = [f"**{c}**" if bold and c != "—" and i < 3 else c for i, c in enumerate(cells)]
        lines.append(f"| {label} | " + " | ".join([*row, kl_cell]) + " |")
    lines += ["", "RLHF vs SFT, paired: win rate (wins + ties/2) "
              f"{_cell([r['win_rate/rlhf_vs_sft'] for r in runs])} against a ceiling (a perfect "
              f"policy) of {_cell([r['win_rate/ceiling'] for r in runs])}; wins / (wins + losses) "
              + _cell([r["wins/rlhf_vs_sft"] / max(r["wins/rlhf_vs_sft"] + r["losses/rlhf_vs_sft"],
                                                   1) for r in runs])
              + "; best-of-4 vs SFT "
              + _cell([r["win_rate/best_of_n_vs_sft"] for r in runs]) + "."]
    return "\n".join(lines) + "\n"


RENDERERS = {"pipeline": pipeline_table}
BLOCK = re.compile(r"<!-- results:(\w+):start -->\n(.*?)<!-- results:\1:end -->", re.S)


def blocks(text: str) -> dict[str, str]:
    """The marked results blocks of a README: ``{set name: block text}``."""
    return {m.group(1): m.group(2) for m in BLOCK.finditer(text)}


def update_readme(readme: str | Path = ROOT / "README.md",
                  results_root: str | Path = RESULTS) -> list[str]:
    """Re-render every marked block whose results set has files; returns the sets rendered."""
    readme, done = Path(readme), []
    text = readme.read_text()
    if "pipeline" not in blocks(text) and _seed_dirs(Path(results_root) / "pipeline"):
        text = _mark_main_table(text)
    for name in blocks(text):
        table = RENDERERS[name](Path(results_root) / name)
        text = BLOCK.sub(lambda m: m.group(0) if m.group(1) != name else
                         f"<!-- results:{name}:start -->\n{table}<!-- results:{name}:end -->",
                         text)
        done.append(name)
    readme.write_text(text)
    return done


def _mark_main_table(text: str, heading: str = "## Results on the embedded task") -> str:
    """Wrap the first table after ``heading`` (and its "RLHF vs SFT, paired" paragraph) in the
    pipeline block's markers, so it is rendered from then on."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    start = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    if end + 1 < len(lines) and lines[end + 1].startswith("RLHF vs SFT, paired"):
        end = next((i for i in range(end + 1, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join([*lines[:start], "<!-- results:pipeline:start -->",
                      "<!-- results:pipeline:end -->", *lines[end:]])


def check_readme(readme: str | Path = ROOT / "README.md",
                 results_root: str | Path = RESULTS) -> list[str]:
    """Problems: a marked block that differs from its files' rendering, or a committed results
    set no block shows. Empty when the README reports exactly the committed files."""
    found = blocks(Path(readme).read_text())
    problems = [f"README block `{name}` differs from {Path(results_root) / name}: run "
                "`python -m rlhf_jax.results update-readme`"
                for name, text in found.items()
                if text != RENDERERS[name](Path(results_root) / name)]
    for name in RENDERERS:
        if _seed_dirs(Path(results_root) / name) and name not in found:
            problems.append(f"results/{name} has runs but README has no "
                            f"`<!-- results:{name}:start -->` block")
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rlhf_jax.results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="copy runs' result files into results/<set>/seed<S>")
    c.add_argument("runs", nargs="+")
    c.add_argument("--dest", default=str(RESULTS / "pipeline"))
    u = sub.add_parser("update-readme", help="re-render README's marked result tables")
    u.add_argument("--readme", default=str(ROOT / "README.md"))
    args = p.parse_args(argv)
    if args.cmd == "collect":
        for d in collect(args.runs, args.dest):
            print(d)
    else:
        print("rendered:", ", ".join(update_readme(args.readme)) or "no marked block")


if __name__ == "__main__":
    main()
