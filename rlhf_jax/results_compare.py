"""The README's loss-zoo tables (``compare`` set) from one committed ``experiments/compare.py`` run:
``results/compare/`` holds the run's ``results.json`` (every method × seed's final held-out numbers
and gold-vs-KL trajectory), ``summary.json``, ``config.json``, ``meta.json``, ``results.md``, a
``methods.json`` of each method's hyperparameters (from its seed-0 run's config) and, per method and
seed, ``<method>/seed<S>/summary.json`` plus (online methods) a ``metrics.jsonl`` excerpt of the
training diagnostics the README quotes (``RUN_KEYS``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from rlhf_jax.results_tables import (cell, read_json, unpad_exponent, where,
                                      write_metrics_excerpt)
from rlhf_jax.stages.compare_report import matched, matched_kl

FILES = ("results.json", "summary.json", "config.json", "meta.json", "results.md")
RUN_KEYS = ("step", "rollout/fill_rate", "rollout/groups_with_spread", "rollout/entropy",
            "rollout/length", "rollout/overlong_penalty", "train/clip_frac")
HPARAMS = {  # method config → methods.json (dotted paths into the run's config.json)
    "online": ("ppo.policy_loss", "ppo.kl_coef", "ppo.kl_in_loss", "ppo.clip_eps",
               "ppo.clip_eps_high", "ppo.group_size", "ppo.prompts_per_iter", "ppo.keep_groups",
               "policy_optim.learning_rate"),
    "offline": ("loss", "beta", "ipo_tau", "simpo_beta", "simpo_margin", "orpo_lambda",
                "kto_label_flip", "steps", "batch_prompts", "optim.learning_rate"),
}
NAMES = {"ppo": "PPO", "dpo": "DPO", "ipo": "IPO", "simpo": "SimPO", "grpo": "GRPO",
         "rloo": "RLOO", "dr_grpo": "Dr. GRPO", "dapo": "DAPO", "gspo": "GSPO",
         "gspo_token": "GSPO-token", "reinforce_pp": "REINFORCE++", "raft": "RAFT",
         "online_dpo": "online DPO", "kto": "KTO", "orpo": "ORPO"}
COLUMNS = (("gold", "gold", max), ("fabrication_rate", "fabrication", min),
           ("accuracy", "accuracy", max), ("win_rate", "win rate vs SFT", max),
           ("kl", "KL to SFT (nats/seq)", None))


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
    return None if cfg == {} else cfg


def collect_compare(run_dirs: Sequence[str | Path], dest: str | Path) -> list[Path]:
    """Copy one finished compare run's result files (``FILES``), each method × seed's summary
    (and the online runs' ``RUN_KEYS`` excerpt of ``metrics.jsonl``) and ``methods.json`` into
    ``dest`` (replacing what was there)."""
    if len(run_dirs) != 1:
        raise ValueError(f"the compare set is one compare run, got {len(run_dirs)}: {run_dirs}")
    run, dest = Path(run_dirs[0]), Path(dest)
    if not (run / "results.json").exists():
        raise FileNotFoundError(f"{run}: no finished compare run (no results.json)")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in FILES:
        shutil.copy(run / name, dest / name)
    methods = {}
    for method, runs in read_json(run / "results.json")["runs"].items():
        for r in runs:
            src = run / method / f"seed{r['seed']}"
            target = dest / method / f"seed{r['seed']}"
            target.mkdir(parents=True)
            shutil.copy(src / "summary.json", target / "summary.json")
            rows = (src / "metrics.jsonl").read_text().splitlines()
            if rows and "rollout/entropy" in json.loads(rows[-1]):   # online runs
                write_metrics_excerpt(src / "metrics.jsonl", target / "metrics.jsonl", RUN_KEYS)
        cfg = read_json(run / method / f"seed{runs[0]['seed']}" / "config.json")
        kind = "online" if "ppo" in cfg else "offline"
        methods[method] = {"kind": kind, **{k: _get(cfg, k) for k in HPARAMS[kind]}}
    (dest / "methods.json").write_text(json.dumps(methods, indent=1, sort_keys=True) + "\n")
    return [dest]


def _num(x: float) -> str:
    if x and abs(x) < 1e-2:
        return unpad_exponent(f"{x:.0e}")
    return f"{x:g}"


def label(method: str, h: dict, start: str = "sft") -> str:
    """A method's row label with the hyperparameters that define it (from ``methods.json``)."""
    name, extra = NAMES.get(method, method), ""
    if method in ("dpo", "kto") and h.get("beta") is not None:
        extra = f"β {_num(h['beta'])}"
    elif method == "ipo" and h.get("ipo_tau") is not None:
        extra = f"τ {_num(h['ipo_tau'])}"
    elif method == "simpo" and h.get("simpo_beta") is not None:
        extra = f"β {_num(h['simpo_beta'])}, γ {_num(h['simpo_margin'])}"
    elif method == "orpo" and h.get("orpo_lambda") is not None:
        extra = f"λ {_num(h['orpo_lambda'])}, lr {_num(h['optim.learning_rate'])}"
    elif h.get("kind") == "online" and h.get("ppo.kl_coef") == 0:
        extra = "no KL"
    if method == "gspo" and h.get("ppo.clip_eps") is not None:
        extra = f"ε {_num(h['ppo.clip_eps'])} / {_num(h['ppo.clip_eps_high'])}"
    text = f"{name} ({extra})" if extra else name
    return text + (", from the base model" if start != "sft" else "")


def _bold(rows: list[list[str]], values: list[list[float | None]], best) -> None:
    """Bold, per column with a ``best`` (max / min), the cells whose rounded mean is the best."""
    for j, pick in enumerate(best):
        means = [v[j] for v in values if v[j] is not None]
        if pick is None or not means:
            continue
        top = f"{pick(means):.3f}"
        for row, v in zip(rows, values):
            if v[j] is not None and f"{v[j]:.3f}" == top:
                row[j] = f"**{row[j]}**"


def compare_table(results_dir: str | Path) -> str:
    """The loss zoo side by side (final held-out metrics, mean ± std over seeds, the best of each
    column in bold) and the matched-KL table (gold and fabrication where each run's trajectory
    first reaches the run's matched KL), from ``results_dir/results.json`` and ``methods.json``."""
    results_dir = Path(results_dir)
    res = read_json(results_dir / "results.json")
    hp = read_json(results_dir / "methods.json") if (results_dir / "methods.json").exists() else {}
    cfg = read_json(results_dir / "config.json")
    runs = {m: res["runs"][m] for m in res.get("methods", res["runs"]) if m in res["runs"]}
    target = float(res["matched_kl"])
    sfts = {json.dumps(r["sft"], sort_keys=True) for rs in runs.values() for r in rs}
    if len(sfts) != 1:
        raise ValueError(f"{results_dir / 'results.json'}: the runs start from {len(sfts)} "
                         "different SFT models; a compare set is one shared upstream")
    sft, first = json.loads(sfts.pop()), next(iter(runs.values()))[0]
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    labels = {m: label(m, hp.get(m, {}), rs[0].get("start", "sft")) for m, rs in runs.items()}
    lines = [f"Seeds {', '.join(map(str, seeds))} of one `compare.py` run, mean ± std (files in "
             f"`{where(results_dir)}/`; rendered by `python -m rlhf_jax.results update-readme`):",
             "", "| method | " + " | ".join(h for _, h, _ in COLUMNS)
             + " | W / T / L vs SFT (mean) | train s |", "|---" * (len(COLUMNS) + 3) + "|",
             "| SFT | " + " | ".join(cell([sft[k]]) for k, _, _ in COLUMNS[:3])
             + " | — | 0 | — | — |"]
    rows, means = [], []
    for method, rs in runs.items():
        rows.append([cell([r[k] for r in rs]) for k, _, _ in COLUMNS])
        means.append([float(np.mean([r[k] for r in rs])) for k, _, _ in COLUMNS])
    _bold(rows, means, [b for _, _, b in COLUMNS])
    for (method, rs), row in zip(runs.items(), rows):
        wtl = " / ".join(f"{np.mean([r[k] for r in rs]):.0f}" for k in ("wins", "ties", "losses"))
        lines.append(f"| {labels[method]} | " + " | ".join(row)
                     + f" | {wtl} | {np.mean([r['time_s'] for r in rs]):.0f} |")
    pairs = first["wins"] + first["ties"] + first["losses"]
    lines += ["", f"(win-rate ceiling {first['win_rate_ceiling']:.3f}; W / T / L: wins, ties and "
              f"losses against SFT over {pairs} paired held-out samples; \"train s\": wall time "
              f"of a run, compilation and the {cfg.get('eval_points', 8) - 1} intermediate "
              "evaluations included.)", ""]
    if cfg.get("matched_kl"):
        source = "given as `--matched-kl`"
    else:
        low = min(((r["kl"], m, r["seed"]) for m, rs in runs.items() for r in rs
                   if r.get("start", "sft") == "sft"))
        assert abs(low[0] - matched_kl(runs)) < 1e-12
        source = f"the smallest final KL of any run that starts from SFT ({labels[low[1]]}, " \
                 f"seed {low[2]})"
    lines += [f"At matched KL — {target:.3f} nats/seq, {source} — read off each run's held-out "
              "trajectory by linear interpolation at its first crossing:", "",
              f"| method | gold at KL {target:.3f} | fabrication at KL {target:.3f} |",
              "|---|---|---|"]
    rows, means = [], []
    for method, rs in runs.items():
        found = [matched(r, target) for r in rs]
        if rs[0].get("start", "sft") != "sft":
            rows.append(["— (starts from the base model, not at KL 0)", "—"])
            means.append([None, None])
        elif any(f is None for f in found):
            kl = [r["kl"] for r in rs]
            rows.append([f"not reached (final KL {min(kl):.3f}–{max(kl):.3f})", "—"])
            means.append([None, None])
        else:
            rows.append([cell([f[i] for f in found]) for i in range(2)])
            means.append([float(np.mean([f[i] for f in found])) for i in range(2)])
    _bold(rows, means, [max, min])
    lines += [f"| {labels[m]} | " + " | ".join(row) + " |" for m, row in zip(runs, rows)]
    return "\n".join(lines + _diagnostics(results_dir, runs, labels, hp)) + "\n"


def _seed_files(results_dir: Path, method: str, rs: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Each seed's (summary, metrics rows) of a method; rows empty for an offline run."""
    out = []
    for r in rs:
        d = results_dir / method / f"seed{r['seed']}"
        m = d / "metrics.jsonl"
        out.append((read_json(d / "summary.json"),
                    [json.loads(x) for x in m.read_text().splitlines() if x] if m.exists() else []))
    return out


def _per_seed(values: Sequence[float], digits: int = 2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def _diagnostics(results_dir: Path, runs: dict, labels: dict, hp: dict) -> list[str]:
    """The training diagnostics the README's prose reads, from the per-run files: held-out
    malformed rate; for online runs the rollout entropy at the first and last iteration and the
    clip fraction; DAPO's fill rate and overlong punishment; KTO's binary labels."""
    if not all((results_dir / m / f"seed{rs[0]['seed']}").is_dir() for m, rs in runs.items()):
        return []
    seeds = " / ".join(str(r["seed"]) for r in next(iter(runs.values())))
    lines = ["", f"Training diagnostics per run (values per seed {seeds}; from "
             "`<method>/seed<S>/summary.json` and `metrics.jsonl`):", "",
             "| method | malformed (held-out) | rollout entropy, first → last iteration "
             "| clip fraction, mean over iterations | clip fraction, lowest – highest "
             "iteration |",
             "|---|---|---|---|---|"]
    notes = []
    for method, rs in runs.items():
        files = _seed_files(results_dir, method, rs)
        mal = [next((v for k, v in s.items() if k.startswith("malformed_rate/")
                     and not k.endswith("/sft")), None) for s, _ in files]
        cells = ["—" if None in mal else _per_seed(mal, 3), "—", "—", "—"]
        if all(rows and "rollout/entropy" in rows[0] for _, rows in files):
            cells[1] = " / ".join(f"{rows[0]['rollout/entropy']:.2f} → "
                                  f"{rows[-1]['rollout/entropy']:.2f}" for _, rows in files)
        if all(rows and "train/clip_frac" in rows[0] for _, rows in files):
            clip = [[x["train/clip_frac"] for x in rows] for _, rows in files]
            ratio = hp.get(method, {}).get("ppo.policy_loss") != "reinforce"
            cells[2:] = [_per_seed([np.mean(c) for c in clip]) if ratio else "— (no ratio)",
                         f"{min(map(min, clip)):.2f} – {max(map(max, clip)):.2f}" if ratio
                         else "—"]
        lines.append(f"| {labels[method]} | " + " | ".join(cells) + " |")
        if all(rows and "rollout/fill_rate" in rows[0] for _, rows in files):
            notes.append(_fill_note(NAMES.get(method, method), [rows for _, rows in files],
                                    hp.get(method, {})))
        if all("binary_feedback/responses" in s for s, _ in files):
            b = [s for s, _ in files]
            notes.append(
                f"{NAMES.get(method, method)}'s binary labels: "
                f"{b[0]['binary_feedback/responses']:,} responses, "
                f"{100 * b[0]['binary_feedback/gold_top_share']:.1f} % at the judge's top score "
                "(desirable before noise); flipped with probability "
                f"{b[0]['binary_feedback/flip']:g}: "
                + " / ".join(f"{100 * x['binary_feedback/flipped_share']:.1f} %" for x in b)
                + " flipped, " + " / ".join(f"{100 * x['binary_feedback/desirable_share']:.1f} %"
                                           for x in b) + " desirable after noise.")
    return lines + [x for n in notes for x in ("", n)]


def _fill_note(label: str, runs: list[list[dict]], h: dict) -> str:
    """DAPO's dynamic sampling: fill rate, groups with spread, overlong punishment, length."""
    fill = [[x["rollout/fill_rate"] for x in rows] for rows in runs]
    spread = [[x.get("rollout/groups_with_spread", np.nan) for x in rows] for rows in runs]
    per_iter = (h.get("ppo.prompts_per_iter") or 0) * (h.get("ppo.group_size") or 1)
    pen = [[x.get("rollout/overlong_penalty", 0.0) for x in rows] for rows in runs]
    fired = sum(sum(p != 0 for p in ps) for ps in pen)
    length = [x["rollout/length"] for rows in runs for x in rows if "rollout/length" in x]
    text = (f"{label}'s fill rate (share of its {h.get('ppo.keep_groups', '?')} training slots "
            f"filled with groups whose rewards differ): mean over the iterations "
            f"{_per_seed([np.mean(f) for f in fill])}, over the first 10 "
            f"{_per_seed([np.mean(f[:10]) for f in fill])}, over the last 10 "
            f"{_per_seed([np.mean(f[-10:]) for f in fill])}; iterations with no such group: "
            f"{sum(sum(v == 0 for v in f) for f in fill)} of {sum(map(len, fill))}. Share of the "
            f"sampled groups with spread, first 10 → last 10 iterations: " + " / ".join(
                f"{np.mean(s[:10]):.2f} → {np.mean(s[-10:]):.2f}" for s in spread) + ". ")
    text += (f"The overlong punishment fired in {fired} of {sum(map(len, pen))} iterations, "
             f"{cell([sum(map(sum, pen)) * per_iter], 1)} in total over "
             f"{per_iter * sum(map(len, pen)):,} samples" if per_iter else "")
    if length:
        text += f"; mean response length {min(length):.1f}–{max(length):.1f} tokens per iteration"
    return text + "."
