"""The README tables of seed-level result sets, each rendered from committed KB-sized files under
``results/<set>/`` and the collector that copies those files out of finished run directories:

* ``pipeline`` and ``sentiment`` — ``seed<S>/summary.json`` (+ config, meta, trimmed samples) of
  ``experiments/pipeline.py`` / ``sentiment.py`` runs; held-out metrics, mean ± std over seeds;
* ``entropy`` — ``<cell>/seed<S>/`` of PPO runs with and without the adaptive entropy controller
  (``summary.json`` and a ``metrics.jsonl`` excerpt of the rollout entropy, coefficient, RM score);
* ``bf16`` — ``<precision>/seed<S>/summary.json`` of PPO runs in float32 / bf16 (/ + TIS), one
  row per run, with the sampler-vs-trainer log-prob mismatch the summary records.

The comparison of methods (``compare``) is in :mod:`rlhf_jax.results_compare`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_KEPT = 48   # held-out prompts whose samples are committed (all their samples)
LAST = 10           # the entropy table averages the last LAST iterations' rollouts
POLICIES = (  # (row label, summary name, KL cell)
    ("base (pretrained only)", "base", None),
    ("SFT", "sft", "0"),
    ("best-of-4 (SFT samples, RM reranks)", "best_of_n", "kl/best_of_n"),
    ("**RLHF (PPO)**", "rlhf", "kl/rlhf_vs_sft"),
)
METRICS = ("gold", "fabrication_rate", "accuracy", "unknown_rate")
ENTROPY_KEYS = ("step", "rollout/entropy", "entropy/coef", "rollout/rm_score")


# ----------------------------------------------------------------------------- shared
def seed_dirs(results_dir: Path) -> list[Path]:
    """``results_dir/seed<S>`` holding a ``summary.json``, in seed order."""
    dirs = sorted(Path(results_dir).glob("seed*"), key=lambda p: int(p.name[4:]))
    return [d for d in dirs if (d / "summary.json").exists()]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def cell(values: Sequence[float], digits: int = 3) -> str:
    """Mean ± sample std (ddof 1) of ``values`` (the mean alone for one value); a real minus."""
    v = np.asarray(values, np.float64)
    text = (f"{v.mean():.{digits}f}" if v.size == 1
            else f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}")
    return text.replace("-", "−")


def unpad_exponent(text: str) -> str:
    """``5e-05`` → ``5e-5``, ``1e+03`` → ``1e3``: a formatted number's exponent as the README
    writes it (text without an exponent unchanged)."""
    m, sep, e = text.partition("e")
    return f"{m}e{int(e)}" if sep else text


def sci(x: float) -> str:
    """``1.1e-6`` style: one decimal, no zero padding in the exponent."""
    return unpad_exponent(f"{x:.1e}")


def where(results_dir: Path) -> str:
    """``results_dir`` relative to the repository when inside it (as the README shows it)."""
    p = Path(results_dir).resolve()
    return str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)


def _seeds_line(dirs: Sequence[Path], results_dir: Path) -> str:
    return (f"Seeds {', '.join(d.name[4:] for d in dirs)} (files in `{where(results_dir)}/`; "
            "rendered by `python -m rlhf_jax.results update-readme`):")


# a pipeline's last stage: PPO, or an offline loss in its place (``sentiment.py``'s default DPO)
LAST_STAGES = ("ppo", "dpo", "ipo", "simpo", "kto", "orpo")
SAMPLES = ("sft", "rlhf", "best_of_n", *LAST_STAGES[1:])   # an offline stage's samples: its loss


def stage_dir(run: Path, stage: str | None = None) -> Path:
    """A pipeline directory's ``stage`` (finished; default its last stage, one of
    ``LAST_STAGES``), or the run itself."""
    for s in (stage,) if stage else LAST_STAGES:
        if (run / s / "summary.json").exists():
            return run / s
    return run


def write_metrics_excerpt(src: Path, target: Path, keys: Sequence[str]) -> None:
    """``target``: the rows of the ``metrics.jsonl`` ``src``, each cut to ``keys``."""
    rows = [json.loads(line) for line in src.read_text().splitlines() if line]
    target.write_text("".join(json.dumps({k: r[k] for k in keys if k in r}) + "\n"
                              for r in rows))


def _finished(run: Path) -> Path:
    if not (run / "summary.json").exists():
        raise FileNotFoundError(f"{run}: no finished run (no summary.json)")
    return run


def copy_run(run: Path, target: Path, samples: int | None = None,
              metrics: Sequence[str] = ()) -> Path:
    """Copy a run's summary (the run's own), its stage's config and meta, the samples of the first
    ``samples`` held-out prompts (uid order) and a ``metrics.jsonl`` excerpt of ``metrics``."""
    stage = stage_dir(_finished(run))
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "summary.json", target / "summary.json")
    for name in ("config.json", "meta.json"):
        shutil.copy(stage / name, target / name)
    for name in SAMPLES if samples else ():
        src = stage / f"samples_{name}.jsonl"
        if src.exists():
            rows = [json.loads(line) for line in src.read_text().splitlines() if line]
            keep = set(sorted({r["uid"] for r in rows})[:samples])
            (target / src.name).write_text("".join(
                json.dumps(r, sort_keys=True) + "\n" for r in rows if r["uid"] in keep))
    if metrics:
        write_metrics_excerpt(stage / "metrics.jsonl", target / "metrics.jsonl", metrics)
    return target


def run_seed(run: Path) -> int:
    return int(read_json(stage_dir(run) / "meta.json")["seed"])


# ----------------------------------------------------------------------------- pipeline
def collect_seeds(run_dirs: Sequence[str | Path], dest: str | Path,
                  prompts: int = PROMPTS_KEPT) -> list[Path]:
    """Copy each run's summary, config, meta and the samples of its first ``prompts`` held-out
    prompts (uid order) into ``dest/seed<S>`` (S = the run's seed). A pipeline directory's
    samples and config are read from its last stage, ``ppo/`` or an offline loss's (pipeline and
    sentiment sets)."""
    return [copy_run(Path(r), Path(dest) / f"seed{run_seed(Path(r))}", prompts) for r in run_dirs]


def _runs(results_dir: Path) -> tuple[list[Path], list[dict]]:
    dirs = seed_dirs(results_dir)
    if not dirs:
        raise FileNotFoundError(f"{results_dir}: no seed*/summary.json to render")
    return dirs, [read_json(d / "summary.json") for d in dirs]


def pipeline_table(results_dir: str | Path) -> str:
    """The main results table (held-out metrics of base, SFT, best-of-4 and RLHF; mean ± std over
    the committed seeds) and the paired RLHF-vs-SFT line, from ``results_dir/seed*/``."""
    dirs, runs = _runs(Path(results_dir))
    lines = [_seeds_line(dirs, Path(results_dir)), "",
             "| policy | gold | fabrication rate | accuracy (real people) | unknown rate "
             "| KL to SFT (nats/seq) |", "|---|---|---|---|---|---|"]
    for label, name, kl in POLICIES:
        cells = [cell([r[f"{m}/{name}"] for r in runs]) if f"{m}/{name}" in runs[0] else "—"
                 for m in METRICS]
        kl_cell = "—" if kl is None else kl if kl == "0" else cell([r[kl] for r in runs])
        if kl == "kl/best_of_n":   # log N − (N−1)/N: an upper bound when samples repeat
            kl_cell = cell([*{r[kl] for r in runs}]) + " (analytic bound)"
        bold = label.startswith("**")
        row = [f"**{c}**" if bold and c != "—" and i < 3 else c for i, c in enumerate(cells)]
        lines.append(f"| {label} | " + " | ".join([*row, kl_cell]) + " |")
    lines += ["", "RLHF vs SFT, paired: win rate (wins + ties/2) "
              f"{cell([r['win_rate/rlhf_vs_sft'] for r in runs])} against a ceiling (a perfect "
              f"policy) of {cell([r['win_rate/ceiling'] for r in runs])}; wins / (wins + losses) "
              + cell([r["wins/rlhf_vs_sft"] / max(r["wins/rlhf_vs_sft"] + r["losses/rlhf_vs_sft"],
                                                  1) for r in runs])
              + "; best-of-4 vs SFT "
              + cell([r["win_rate/best_of_n_vs_sft"] for r in runs]) + "."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- sentiment
def sentiment_table(results_dir: str | Path) -> str:
    """The sentiment task's table (start, best-of-N, RLHF: gold = mean VADER compound, positive /
    negative rate, exact KL to the start, distinct-1/2, perplexity under the start) and the paired
    line, mean ± std over ``results_dir/seed*/summary.json``."""
    dirs, runs = _runs(Path(results_dir))
    n = {read_json(d / "config.json").get("best_of_n", 4) for d in dirs}
    n = "/".join(str(k) for k in sorted(n))

    def get(key, digits=3):
        values = [r.get(key) for r in runs]       # JSON null (a NaN) or absent: no number
        ok = all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)
        return cell(values, digits) if ok else "—"

    bon_kl = {r.get("kl/best_of_n") for r in runs}    # analytic: one value for every seed
    has_bon = all("gold/best_of_n" in r for r in runs)   # an offline last stage has none
    losses = {read_json(d / "config.json").get("loss", "ppo") for d in dirs}
    method = "/".join(sorted(m.upper() for m in losses))

    rows = [("start (pretrained, `sft`)", "sft", "0"),
            *[(f"best-of-{n} (RM reranks start's samples)", "best_of_n",
               (cell([*bon_kl]) if len(bon_kl) == 1 else get("kl/best_of_n")) + " (analytic)")
              ] * has_bon,
            (f"**RLHF ({method})**", "rlhf", f"**{get('kl/rlhf_vs_sft')}**")]
    lines = [_seeds_line(dirs, Path(results_dir)), "",
             "| policy | gold (mean compound) | positive rate | negative rate | KL to start "
             "(nats/seq, exact) | distinct-1 | distinct-2 | perplexity under start |",
             "|---|---|---|---|---|---|---|---|"]
    for label, name, kl in rows:
        cells = [get(f"{m}/{name}") for m in ("gold", "positive_rate", "negative_rate")]
        cells += [kl] + [get(f"distinct_{k}/{name}") for k in (1, 2)]
        cells.append(get(f"perplexity/{name}_under_sft", 1))
        if name == "rlhf":
            cells[0] = f"**{cells[0]}**"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    met = sum(bool(r.get("bar/win_rate")) for r in runs)
    pairs = sum(runs[0][f"{k}/rlhf_vs_sft"] for k in ("wins", "ties", "losses"))
    lines += ["", f"RLHF vs start, paired by prompt and sample ({pairs:,} pairs per seed): "
              "wins / ties / losses (mean) "
              + " / ".join(f"{np.mean([r[f'{k}/rlhf_vs_sft'] for r in runs]):.0f}"
                           for k in ("wins", "ties", "losses"))
              + f"; **win rate {get('win_rate/rlhf_vs_sft')}** (bar 0.60: met in {met} of "
              f"{len(runs)} seeds); KL within the budget of "
              f"{'/'.join(f'{b:g}' for b in sorted({r['kl/budget'] for r in runs}))} nats/seq in "
              f"{sum(bool(r.get('bar/kl')) for r in runs)} of {len(runs)}; distinct-2 ≥ 0.8 × "
              f"the start's in {sum(bool(r.get('bar/distinct_2')) for r in runs)} of {len(runs)}. "
              + (f"Best-of-{n} vs start: {get('win_rate/best_of_n_vs_sft')}. " if has_bon else "")
              + f"RM: `rm/gold_agreement` {get('rm/gold_agreement')} (held-out start samples), "
              f"`rm/noise_ceiling` {get('rm/noise_ceiling')}"
              + (f", agreement on the RLHF policy's held-out samples "
                 f"{get('rm/gold_agreement_on_policy')}." if has_bon else ".")]
    lines += ["", "Per seed (win rate / exact KL / distinct-2 as a share of the start's"
              + (" / PPO iterations run, of the configured" if any(
                  "ppo/iterations_run" in r for r in runs) else "") + "): "
              + "; ".join(_seed_cell(d, r) for d, r in zip(dirs, runs)) + "."]
    return "\n".join(lines) + "\n"


def _seed_cell(run_dir: Path, r: dict) -> str:
    """One seed of the sentiment table: win rate, KL, distinct-2 share, iterations run."""
    cells = [f"{r['win_rate/rlhf_vs_sft']:.3f}", f"{r['kl/rlhf_vs_sft']:.2f}",
             f"{r['distinct_2/rlhf'] / r['distinct_2/sft']:.2f}"]
    if "ppo/iterations_run" in r:
        cfg = read_json(run_dir / "config.json")
        cells.append(f"{r['ppo/iterations_run']} of {cfg.get('iterations', '?')}")
    met = all(r.get(f"bar/{k}") for k in ("win_rate", "kl", "distinct_2"))
    return f"{run_dir.name.replace('seed', 'seed ')} " + " / ".join(cells) + (
        " (**bar met**)" if met else "")


# ----------------------------------------------------------------------------- entropy
def _entropy_cell(cfg: dict) -> str:
    target = float(cfg.get("ppo", {}).get("entropy_target") or 0.0)
    return f"target{target:g}" if target > 0 else "none"


def collect_entropy(run_dirs: Sequence[str | Path], dest: str | Path) -> list[Path]:
    """Copy each PPO run (or a pipeline's PPO stage) into ``dest/<cell>/seed<S>``: ``none``
    without the entropy controller, ``target<H*>`` with it; summary, config, meta and the
    per-iteration rollout entropy, coefficient and RM score (``ENTROPY_KEYS``)."""
    out = []
    for run in map(Path, run_dirs):
        name = _entropy_cell(read_json(stage_dir(_finished(run)) / "config.json"))
        out.append(copy_run(run, Path(dest) / name / f"seed{run_seed(run)}",
                             metrics=ENTROPY_KEYS))
    return out


def _metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line]


def _span(values: Sequence[float]) -> str:
    return f"{min(values):.2f} to {max(values):.2f}".replace("-", "−")


def entropy_table(results_dir: str | Path) -> str:
    """The entropy–gold–KL trade-off: per controller target (``none`` first), the rollout
    entropy and coefficient averaged over the last ``LAST`` iterations, the held-out evaluation,
    and (range over seeds) the largest rollout entropy / lowest rollout RM score after iteration
    ``LAST``; mean ± std over seeds."""
    cells = sorted((p for p in Path(results_dir).iterdir() if seed_dirs(p)),
                   key=lambda p: -1.0 if p.name == "none" else float(p.name[len("target"):]))
    if not cells:
        raise FileNotFoundError(f"{results_dir}: no <cell>/seed*/summary.json to render")
    seeds = {", ".join(d.name[4:] for d in seed_dirs(c)) for c in cells}
    lines = [f"Seeds {seeds.pop()} in every row (files" if len(seeds) == 1 else "Files"]
    lines = [f"{lines[0]} in `{where(Path(results_dir))}/`; rendered by "
             "`python -m rlhf_jax.results update-readme`):", "",
             "| H* (nats/token) | rollout entropy | coefficient c | gold | fabrication rate "
             "| accuracy | KL(RLHF ‖ SFT) | win rate vs SFT | largest rollout entropy after it. "
             f"{LAST} | lowest rollout RM score after it. {LAST} |", "|---" * 10 + "|"]
    for c in cells:
        dirs = seed_dirs(c)
        runs, ms = [read_json(d / "summary.json") for d in dirs], [_metrics(d) for d in dirs]
        late = [m[LAST:] for m in ms]
        coef = ("0" if c.name == "none" else
                cell([np.mean([r["entropy/coef"] for r in m[-LAST:]]) for m in ms]))
        lines.append(" | ".join([
            ("| none (no bonus)" if c.name == "none" else f"| {float(c.name[6:]):.2f}")
            + ("" if not seeds else f" (seeds {', '.join(d.name[4:] for d in dirs)})"),
            cell([np.mean([r["rollout/entropy"] for r in m[-LAST:]]) for m in ms]), coef,
            *(cell([r[f"{k}/rlhf"] for r in runs]) for k in ("gold", "fabrication_rate",
                                                              "accuracy")),
            *(cell([r[k] for r in runs]) for k in ("kl/rlhf_vs_sft", "win_rate/rlhf_vs_sft")),
            _span([max(r["rollout/entropy"] for r in m) for m in late]),
            _span([min(r["rollout/rm_score"] for r in m) for m in late])]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- bf16
def _precision_cell(cfg: dict) -> str:
    tis = float(cfg.get("ppo", {}).get("tis_cap") or 0.0)
    return (cfg.get("precision") or "float32") + (f"-tis{tis:g}" if tis > 0 else "")


def collect_precision(run_dirs: Sequence[str | Path], dest: str | Path) -> list[Path]:
    """Copy each PPO run into ``dest/<precision>[-tis<C>]/seed<S>`` (summary, config, meta)."""
    out = []
    for run in map(Path, run_dirs):
        name = _precision_cell(read_json(stage_dir(_finished(run)) / "config.json"))
        out.append(copy_run(run, Path(dest) / name / f"seed{run_seed(run)}"))
    return out


def bf16_table(results_dir: str | Path) -> str:
    """One row per PPO run (float32, bf16, bf16 + TIS; by seed): held-out gold of SFT and RLHF,
    win rate, fabrication, accuracy, KL, and |log π_sampler − log π_old| at the last iteration /
    the largest over the run (max and mean over tokens), then float32 vs bf16 mean gold."""
    order = {"float32": 0, "bf16": 1}
    cells = sorted((p for p in Path(results_dir).iterdir() if seed_dirs(p)),
                   key=lambda p: (order.get(p.name, 2), p.name))
    if not cells:
        raise FileNotFoundError(f"{results_dir}: no <precision>/seed*/summary.json to render")
    lines = [f"Files in `{where(Path(results_dir))}/` (rendered by "
             "`python -m rlhf_jax.results update-readme`):", "",
             "| precision | seed | gold SFT | gold RLHF | win rate vs SFT | fabrication | accuracy "
             "| KL (nats) | max diff, last / largest | mean diff, last / largest |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    gold = {}
    for c in cells:
        prec, _, tis = c.name.partition("-tis")
        label = prec + (f" + TIS (C = {tis})" if tis else "")
        for d in seed_dirs(c):
            s = read_json(d / "summary.json")
            gold.setdefault(c.name, []).append(s["gold/rlhf"])
            diffs = [f"{sci(s[f'final/rollout/logprob_{k}_diff'])} / "
                     f"{sci(s[f'max/rollout/logprob_{k}_diff'])}" for k in ("max", "mean")]
            lines.append(f"| {label} | {d.name[4:]} | " + " | ".join(
                [cell([s[k]]) for k in ("gold/sft", "gold/rlhf", "win_rate/rlhf_vs_sft",
                                         "fabrication_rate/rlhf", "accuracy/rlhf",
                                         "kl/rlhf_vs_sft")] + diffs) + " |")
    a, b = gold.get("float32", []), gold.get("bf16", [])
    if len(a) == len(b) > 1:
        pooled = np.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
        lines += ["", f"Mean gold RLHF ({len(a)} seeds each): float32 {cell([np.mean(a)])}, "
                  f"bf16 {cell([np.mean(b)])}; "
                  f"|Δ| = {abs(np.mean(a) - np.mean(b)):.3f} against "
                  f"2 × pooled std / √{len(a)} = "
                  f"{2 * pooled / np.sqrt(len(a)):.3f} (pooled std {pooled:.3f})."]
    return "\n".join(lines) + "\n"
