"""The comparison's read-out, as pure functions over run results: gold-vs-KL curves, values at a
matched KL, mean ± std over seeds, the markdown table and the plot.

A *run result* is a dict with the method's final held-out metrics (the task's: ``headline`` and
``reported`` keys of ``Task``, e.g. ``gold``, ``fabrication_rate``, ``accuracy``, ``unknown_rate``
for the facts world; and ``win_rate``, ``wins``, ``ties``, ``losses``, ``kl``, ``time_s``,
``budget``) and ``curve``: the trajectory ``[(kl, gold, second headline metric), …]`` in training
order, starting at the SFT model (KL 0) and ending at the final policy.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

PAIRED = (("win_rate", "win rate vs SFT"), ("kl", "KL to SFT (nats/seq)"))


def short(metric: str) -> str:
    """A metric's name in table headers and ``<name>_at_kl`` keys: a trailing ``_rate`` dropped."""
    return metric[:-len("_rate")] if metric.endswith("_rate") else metric


def columns(headline: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``(key, header)`` of the results table: the task's headline metrics, then the paired ones."""
    return tuple((m, short(m)) for m in headline) + PAIRED


def at_kl(curve: Sequence[Sequence[float]], target: float) -> tuple[float, ...] | None:
    """The curve's values where its KL first reaches ``target``, by linear interpolation between
    the two points around the first crossing (walking in training order); None if it never does.
    ``curve`` rows are ``(kl, value, …)``; the result holds the interpolated ``value, …``."""
    pts = [tuple(float(v) for v in p) for p in curve]
    if not pts:
        return None
    if pts[0][0] >= target:
        return pts[0][1:]
    for a, b in zip(pts, pts[1:]):
        if b[0] >= target:
            w = (target - a[0]) / (b[0] - a[0])
            return tuple(x + w * (y - x) for x, y in zip(a[1:], b[1:]))
    return None


def matched_kl(results: dict[str, list[dict]]) -> float:
    """The KL every run reaches: the smallest final KL over all methods and seeds (each curve
    starts at KL 0, so each crosses it); runs that start from the base model (ORPO), whose curve
    does not start at SFT, are left out when any other run is present."""
    runs = [r for rs in results.values() for r in rs]
    from_sft = [r for r in runs if r.get("start", "sft") == "sft"] or runs
    return min(r["kl"] for r in from_sft)


def matched(run: dict, target: float) -> tuple[float, ...] | None:
    """:func:`at_kl` of a run's curve; None for a run that started from the base model (its KL to
    SFT does not start at 0, so "the first crossing" says nothing about KL spent)."""
    return None if run.get("start", "sft") != "sft" else at_kl(run["curve"], target)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value); NaN-free inputs."""
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def aggregate(results: dict[str, list[dict]], target_kl: float, *, metrics: Sequence[str],
              curve: Sequence[str]) -> dict[str, dict]:
    """Per method: (mean, std) over seeds of every final metric (the task's ``metrics``, then
    ``win_rate``, ``kl``, ``time_s``), and ``<short(m)>_at_kl`` at ``target_kl`` for the metrics
    ``curve`` names (the curve's values after its KL, e.g. ``gold``, ``fabrication_rate``)."""
    out = {}
    for method, runs in results.items():
        row = {}
        for key in (*metrics, "win_rate", "kl", "time_s"):
            row[key] = mean_std(r[key] for r in runs)
        found = [matched(r, target_kl) for r in runs]
        if all(m is not None for m in found):
            for i, m in enumerate(curve):
                row[f"{short(m)}_at_kl"] = mean_std(v[i] for v in found)
        row["seeds"] = len(runs)
        row["budget"] = runs[0].get("budget", "")
        out[method] = row
    return out


def markdown(results: dict[str, list[dict]], sft: list[dict], target_kl: float, *,
             headline: Sequence[str], target_source: str = "the smallest final KL of any run"
             ) -> str:
    """The results table (defaults; the task's ``headline`` metrics as columns) and the
    matched-KL table (the curve's metrics, ``headline[:2]``), mean ± std over seeds."""
    cols, curve = columns(headline), tuple(headline[:2])
    lines = ["| method | " + " | ".join(h for _, h in cols) + " | W / T / L vs SFT | budget "
             "| train s |", "|---" * (len(cols) + 4) + "|"]
    lines.append("| SFT | " + " | ".join(_fmt([s[k] for s in sft]) if k != "win_rate" else "—"
                                       for k, _ in cols[:-1]) + " | 0 | — | — | — |")
    for method, runs in results.items():
        cells = [_fmt([r[k] for r in runs]) for k, _ in cols]
        wtl = " / ".join(f"{np.mean([r[k] for r in runs]):.0f}" for k in ("wins", "ties", "losses"))
        t = f"{np.mean([r['time_s'] for r in runs]):.0f}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {wtl} | {runs[0]['budget']} "
                     f"| {t} |")
    lines += ["", f"At matched KL = {target_kl:.3f} nats/seq ({target_source}; "
              "values interpolated along each run's held-out gold-vs-KL trajectory):", "",
              "| method | " + " | ".join(f"{short(m)} at matched KL" for m in curve) + " |",
              "|---" * (len(curve) + 1) + "|"]
    for method, runs in results.items():
        found = [matched(r, target_kl) for r in runs]
        ok = all(m is not None for m in found)
        why = "from the base model" if runs[0].get("start", "sft") != "sft" else "not reached"
        cells = [_fmt([m[i] for m in found]) if ok else why for i in range(len(curve))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], target_kl: float, path) -> None:
    """Gold score vs KL to SFT: every run's held-out trajectory (thin), final points (large)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # 10 methods or fewer: matplotlib's default colours; more (``all``): 20 distinct ones
    cmap = plt.get_cmap("tab20") if len(results) > 10 else None
    for i, (method, runs) in enumerate(results.items()):
        color = f"C{i}" if cmap is None else cmap(i % 20)
        for j, r in enumerate(runs):
            kl, gold = zip(*[(p[0], p[1]) for p in r["curve"]])
            ax.plot(kl, gold, "-o", color=color, alpha=0.45, lw=1, ms=3,
                    label=method if j == 0 else None)
            ax.plot(kl[-1], gold[-1], "o", color=color, ms=8)
    ax.axvline(target_kl, color="grey", ls="--", lw=1, label=f"matched KL {target_kl:.2f}")
    ax.set_xlabel("KL to SFT (nats / sequence, held-out samples)")
    ax.set_ylabel("gold score (held-out)")
    ax.set_title("Gold score vs KL to SFT (SFT at KL 0; one line per seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
