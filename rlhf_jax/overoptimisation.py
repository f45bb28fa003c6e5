"""Reward over-optimisation against the gold judge (Gao et al. 2022, "Scaling laws for reward
model overoptimization"): the functional forms, their least-squares fits, where they peak, and the
read-out of PPO trajectories and best-of-n curves (table, figures).

With d = sqrt(KL(π ‖ π_SFT)) and R(d) the *gain* of the gold score over the starting policy's:

* best-of-n: ``R(d) = d (α − β d)``, peaking at d* = α / (2β) (β > 0);
* RL:        ``R(d) = d (α − β log d)``, peaking at d* = exp(α/β − 1) (β > 0).

Both are linear in (α, β), so :func:`fit` solves one least-squares problem with no intercept (the
forms are 0 at d = 0). A *curve* here is a list of points ``{"kl", "gold", "proxy", …}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

FORMS = ("bon", "rl")


def _features(d: np.ndarray, form: str) -> np.ndarray:
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose from {FORMS}")
    d = np.asarray(d, np.float64)
    if np.any(d < 0):
        raise ValueError("d = sqrt(KL) must be >= 0")
    if form == "bon":
        return np.stack([d, -d * d], axis=1)
    dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return np.stack([d, -dlogd], axis=1)


def gao(d, alpha: float, beta: float, form: str) -> np.ndarray:
    """Gao et al.'s gold gain ``R(d)`` (``form`` ``bon`` or ``rl``) at ``d`` = sqrt(KL)."""
    return _features(np.atleast_1d(d), form) @ np.array([alpha, beta])


def fit(d: Sequence[float], gain: Sequence[float], form: str) -> dict[str, float]:
    """Least-squares ``alpha``, ``beta`` of the form to points ``(d, gain)`` and ``r2``
    (1 − SS_res / SS_tot about the gains' mean; NaN with fewer than 3 points or constant gains)."""
    x = _features(np.asarray(d, np.float64), form)
    y = np.asarray(gain, np.float64)
    if len(y) < 2:
        raise ValueError(f"fitting needs at least 2 points, got {len(y)}")
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    ss_res = float(np.sum((y - x @ coef) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if len(y) >= 3 and ss_tot > 0 else float("nan")
    return {"alpha": float(coef[0]), "beta": float(coef[1]), "r2": r2}


def peak(alpha: float, beta: float, form: str) -> float | None:
    """The d ≥ 0 at which the fitted gain is largest (None when it rises for ever: β ≤ 0; 0 for
    best-of-n's form with α ≤ 0 < β, whose gain falls from the start)."""
    if beta <= 0:
        return None
    return max(alpha / (2 * beta), 0.0) if form == "bon" else math.exp(alpha / beta - 1)


def read_out(d: Sequence[float], gold: Sequence[float], gold0: float, form: str) -> dict:
    """The fit of ``gold − gold0`` against ``d``, and where gold peaks: ``kl_at_peak`` = d*² when
    the fitted peak lies inside the range reached (0 < d* ≤ max d), else None;
    ``kl_at_peak_fitted`` the fitted d*² wherever it lies (None when β ≤ 0); ``kl_max`` the
    largest KL reached; ``gold_peak`` gold0 + the fitted gain's maximum over [0, max d];
    ``gold_max`` the largest gold measured."""
    d = np.asarray(d, np.float64)
    gold = np.asarray(gold, np.float64)
    f = fit(d, gold - gold0, form)
    d_max = float(d.max())
    d_star = peak(f["alpha"], f["beta"], form)
    inside = d_star is not None and 0 < d_star <= d_max
    grid = np.linspace(0.0, d_max, 401)
    if inside:
        grid = np.append(grid, d_star)
    return {**f, "kl_at_peak": d_star ** 2 if inside else None,
            "kl_at_peak_fitted": d_star ** 2 if d_star is not None else None,
            "kl_max": d_max ** 2, "gold0": float(gold0),
            "gold_peak": float(gold0 + gao(grid, f["alpha"], f["beta"], form).max()),
            "gold_max": float(gold.max())}


def trajectory(rows: Sequence[dict]) -> list[dict]:
    """A PPO run's per-iteration points from its ``metrics.jsonl`` rows: the exact KL to SFT, the
    gold and the (normalised) RM score of the iteration's own rollouts, all of the policy that
    sampled them (iteration 1: SFT, KL 0)."""
    keys = ("kl/exact_per_sequence", "rollout/gold", "rollout/rm_score")
    return [{"step": int(r["step"]), "kl": max(float(r[keys[0]]), 0.0), "gold": float(r[keys[1]]),
             "proxy": float(r[keys[2]])} for r in rows if all(k in r for k in keys)]


def at_kl(curve: Sequence[dict], kl: float, key: str = "gold") -> float | None:
    """``key`` of a curve (in training / n order) where its KL first reaches ``kl``, linearly
    interpolated between the points around that crossing, as the comparison reads its curves
    (``rlhf_jax.stages.compare_report.at_kl``); None if it never does."""
    from rlhf_jax.stages.compare_report import at_kl as first_crossing

    v = first_crossing([(p["kl"], p[key]) for p in curve], kl)
    return None if v is None else float(v[0])


def matched(finals: Sequence[dict], bon: Sequence[dict]) -> list[dict]:
    """RLHF vs best-of-n at the same KL: each PPO cell's final held-out gold and KL against
    best-of-n's gold at that KL (interpolated along the best-of-n curve by its exact KL)."""
    return [{**f, "gold_bon": at_kl(bon, f["kl"])} for f in finals]


def _f(v, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else \
        f"{v:.{digits}f}"


def markdown(per_rm: dict[str, dict]) -> str:
    """The results table: per reward model, best-of-n's curve, every PPO cell's final numbers
    with best-of-n at the same KL, and the fits."""
    lines = []
    for rm, r in per_rm.items():
        lines += [f"**{rm.capitalize()} reward model**", "",
                  "| best-of-n | exact KL | bound log n − (n−1)/n | distinct / prompt | proxy "
                  "| gold |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['n']} | {_f(p['kl'])} | {_f(p['kl_bound'])} | {p['distinct']:.1f} | "
                  f"{_f(p['proxy'])} | {_f(p['gold'])} |" for p in r["bon"]]
        lines += ["", "| PPO cell | β | final held-out KL | gold | best-of-n gold at that KL "
                  "| largest rollout KL | final rollout proxy | final rollout gold |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in r["matched"]:
            lines.append(f"| {m['cell']} | {m['kl_coef']:g} | {_f(m['kl'])} | {_f(m['gold'])} | "
                         f"{_f(m['gold_bon']) if m['gold_bon'] is not None else 'beyond n max'} | "
                         f"{_f(m['kl_max'])} | {_f(m['proxy_last'])} | {_f(m['gold_last'])} |")
        lines += ["", "| fit | α | β | r² | KL at gold peak (in range) | fitted peak KL "
                  "| largest KL | gold(0) | gold peak (fit) | gold max (measured) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name in sorted(r["fits"], key=lambda k: (k != "rl", k)):   # rl, bon, bon_bound
            f = r["fits"][name]
            lines.append(f"| {name} | {_f(f['alpha'])} | {_f(f['beta'])} | {_f(f['r2'])} | "
                         f"{_f(f['kl_at_peak']) if f['kl_at_peak'] is not None else 'none'} | "
                         f"{_f(f['kl_at_peak_fitted'])} | {_f(f['kl_max'])} | {_f(f['gold0'])} | "
                         f"{_f(f['gold_peak'])} | {_f(f['gold_max'])} |")
        lines.append("")
    return "\n".join(lines)


def plot(per_rm: dict[str, dict], out_dir) -> None:
    """``proxy_vs_gold.png`` (proxy and gold against sqrt(KL), one panel per reward model, with
    the fitted gold curves) and ``gold_vs_kl.png`` (gold against KL: PPO trajectories and finals,
    best-of-n by exact KL and by the analytic bound)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    names = list(per_rm)
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
    for ax, rm in zip(axes[0], names):
        r = per_rm[rm]
        for i, (cell, pts) in enumerate(r["trajectories"].items()):
            d = np.sqrt([p["kl"] for p in pts])
            ax.plot(d, [p["proxy"] for p in pts], ".", color=f"C{i}", alpha=0.35, ms=4)
            ax.plot(d, [p["gold"] for p in pts], "o", color=f"C{i}", alpha=0.6, ms=3,
                    label=f"PPO {cell}: gold (o), proxy (·)")
        d = np.sqrt([p["kl"] for p in r["bon"]])
        ax.plot(d, [p["gold"] for p in r["bon"]], "k-s", ms=4, label="best-of-n gold")
        ax.plot(d, [p["proxy"] for p in r["bon"]], "k:^", ms=4, label="best-of-n proxy")
        for name, style in (("rl", "r-"), ("bon", "b--")):
            f = r["fits"].get(name)
            if f:
                x = np.linspace(0, math.sqrt(f["kl_max"]), 200)
                ax.plot(x, f["gold0"] + gao(x, f["alpha"], f["beta"], name), style, lw=1.5,
                        label=f"fit {name}: α={f['alpha']:.2f}, β={f['beta']:.2f}")
        ax.set_xlabel("d = sqrt(KL to SFT), nats^½")
        ax.set_ylabel("score (proxy: normalised RM; gold: judge)")
        ax.set_title(f"{rm} RM: proxy vs gold")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "proxy_vs_gold.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, rm in enumerate(names):
        r, ls = per_rm[rm], ("-", "--")[j % 2]
        for i, pts in enumerate(r["trajectories"].values()):
            ax.plot([p["kl"] for p in pts], [p["gold"] for p in pts], ls, color=f"C{i}",
                    alpha=0.4, lw=1)
        for i, m in enumerate(r["matched"]):
            ax.plot(m["kl"], m["gold"], "o" if j == 0 else "D", color=f"C{i}", ms=7,
                    label=f"PPO {m['cell']} ({rm} RM), held-out")
        ax.plot([p["kl"] for p in r["bon"]], [p["gold"] for p in r["bon"]], "k" + ls + "s",
                ms=4, label=f"best-of-n ({rm} RM), exact KL")
        ax.plot([p["kl_bound"] for p in r["bon"]], [p["gold"] for p in r["bon"]], ls, color="grey",
                marker="x", label=f"best-of-n ({rm} RM), bound log n − (n−1)/n")
    ax.set_xlabel("KL to SFT (nats / sequence)")
    ax.set_ylabel("gold score")
    ax.set_title("Gold vs KL (lines: PPO rollouts per iteration; markers: held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "gold_vs_kl.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ reading a result back
COMMITTED = Path(__file__).resolve().parents[1] / "results" / "overoptimisation"


def tiny_config():
    """The over-optimisation sweep on the shared tiny upstream (``rlhf_jax.tiny``): one β, the
    tiny PPO run's config, best-of-n up to 4 from 4 samples per prompt, the default RM only."""
    from rlhf_jax import scripts, tiny

    return scripts.load("overoptimisation").OveroptConfig(
        reward_dir=str(tiny.tiny_upstream()), weak_rm=False, kl_coefs=(0.05,), extra_cells=(),
        ns=(1, 2, 4), pool=4, ppo=tiny.tiny_config("ppo"))


def load_result(run_dir: str | Path | None = None) -> tuple[dict, dict]:
    """``(summary, results)`` of an over-optimisation run: ``run_dir``; with none, the committed
    README result (``results/overoptimisation``), or else the cached tiny run (announced with
    ``rlhf_jax.tiny.BANNER``)."""
    from rlhf_jax import tiny

    path = Path(run_dir) if run_dir else COMMITTED
    if not run_dir and not (path / "summary.json").exists():
        print(tiny.BANNER, flush=True)
        path = tiny.cached_run("overoptimisation", tiny_config())
    return (json.loads((path / "summary.json").read_text()),
            json.loads((path / "results.json").read_text()))
