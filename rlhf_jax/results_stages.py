"""The README tables of single stages, each rendered from committed KB-sized files under
``results/<set>/`` and the collector that copies them out of finished run directories:

* ``reward`` — ``seed<S>/summary.json`` (+ config, meta) of the reward stages of
  ``experiments/pipeline.py`` runs (or of ``experiments/reward.py`` runs): the RM's held-out
  agreement with the gold judge, overall and per pair of answer kinds, one column per seed;
* ``dpo_beta`` — ``<cell>/seed<S>/summary.json`` (+ config, meta) and the ``index.jsonl`` of one
  ``experiments/sweep.py --script dpo`` run over β: one row per β.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from rlhf_jax.results_tables import (cell, copy_run, read_json, run_seed, seed_dirs, stage_dir,
                                      unpad_exponent, where)

# answer kinds compared by rm/gold_agreement/<a>_vs_<b>, in the README's order (others follow)
PAIR_ORDER = ("correct_vs_fabricated", "correct_vs_unknown", "unknown_vs_fabricated",
              "fabricated_vs_malformed", "correct_vs_malformed", "unknown_vs_malformed")
RM_ROWS = (  # (summary key, row label) after the per-pair rows
    ("rm/spearman", "`rm/spearman` (RM score vs gold score)"),
    ("rm/accuracy", "`rm/accuracy` (vs the noisy labels)"),
    ("rm/noise_ceiling", "`rm/noise_ceiling` (mean of max(p, 1 − p))"),
    ("rm/gold_label_accuracy", "`rm/gold_label_accuracy` (the gold ordering on the same "
                               "labelled pairs)"),
)
OFFLINE_COLUMNS = (("gold", "gold"), ("fabrication_rate", "fabrication"),
                   ("accuracy", "accuracy"), ("malformed_rate", "malformed"))
SWEEP_FILES = ("config.json", "meta.json", "index.jsonl", "results.md")


# ----------------------------------------------------------------------------- reward
def collect_reward(run_dirs: Sequence[str | Path], dest: str | Path) -> list[Path]:
    """Copy each run's reward stage (a pipeline's ``reward/`` or a reward run) summary, config and
    meta into ``dest/seed<S>`` (S = the stage's seed), and a pipeline's SFT stage summary (its
    knowledge probe and fabrication rate) as ``sft_summary.json``."""
    out = []
    for run in map(Path, run_dirs):
        stage = stage_dir(run, "reward")
        out.append(copy_run(stage, Path(dest) / f"seed{run_seed(stage)}"))
        if (run / "sft" / "summary.json").exists():
            shutil.copy(run / "sft" / "summary.json", out[-1] / "sft_summary.json")
    return out


def _pairs(runs: list[dict]) -> list[str]:
    """The answer-kind pairs every seed's summary reports, in ``PAIR_ORDER`` then by name."""
    found = set.intersection(*({k.split("/")[2] for k in r if k.startswith("rm/gold_agreement/")}
                               for r in runs))
    return [p for p in PAIR_ORDER if p in found] + sorted(found - set(PAIR_ORDER))


def reward_table(results_dir: str | Path) -> str:
    """The reward model on held-out SFT samples, one column per seed and mean ± std: gold
    agreement overall and per pair of answer kinds (with the number of pairs), Spearman, accuracy
    on the noisy labels, noise ceiling, the gold ordering's accuracy on the same labels; then the
    weakest pair kind and the accuracy's distance to the gold ordering's."""
    results_dir = Path(results_dir)
    dirs = seed_dirs(results_dir)
    if not dirs:
        raise FileNotFoundError(f"{results_dir}: no seed*/summary.json to render")
    runs = [read_json(d / "summary.json") for d in dirs]
    seeds = [d.name[4:] for d in dirs]
    lines = [f"Seeds {', '.join(seeds)} (files in `{where(results_dir)}/`; rendered by "
             "`python -m rlhf_jax.results update-readme`; in brackets: the number of held-out "
             "pairs):", "",
             "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---" * (len(seeds) + 2) + "|"]

    def row(label: str, key: str, counts: str | None = None) -> str:
        values = [r[key] for r in runs]
        cells = [f"{v:.3f}" + (f" ({r[counts]:,})" if counts else "")
                 for v, r in zip(values, runs)]
        return f"| {label} | " + " | ".join(cells) + f" | {cell(values)} |"

    lines.append(row("`rm/gold_agreement` (pairs with different gold)", "rm/gold_agreement",
                     "rm/gold_pairs" if all("rm/gold_pairs" in r for r in runs) else None))
    pairs = _pairs(runs)
    for p in pairs:
        n = f"rm/pairs/{p}"
        lines.append(row(p.replace("_vs_", " vs "), f"rm/gold_agreement/{p}",
                         n if all(n in r for r in runs) else None))
    lines += [row(label, key) for key, label in RM_ROWS if all(key in r for r in runs)]
    notes = []
    if pairs:
        v, s, p = min((r[f"rm/gold_agreement/{p}"], s, p) for r, s in zip(runs, seeds)
                      for p in pairs)
        n = runs[seeds.index(s)].get(f"rm/pairs/{p}")
        notes.append(f"Weakest pair kind: {p.replace('_vs_', ' vs ')}, seed {s}: {v:.3f}"
                     + (f" on {n:,} pairs" if n is not None else "") + ".")
    if all("rm/accuracy" in r and "rm/gold_label_accuracy" in r for r in runs):
        gap = [100 * (r["rm/gold_label_accuracy"] - r["rm/accuracy"]) for r in runs]
        notes.append("`rm/gold_label_accuracy` − `rm/accuracy` (points, seed "
                     + " / ".join(seeds) + "): "
                     + " / ".join(f"{g:.1f}" for g in gap).replace("-", "−") + ".")
    if notes:   # a paragraph under the table (never appended to its last row)
        lines += ["", " ".join(notes)]
    sft = [d / "sft_summary.json" for d in dirs]
    if all(p.exists() for p in sft):
        sft = [read_json(p) for p in sft]
        lines += ["", f"The SFT stages (seed {' / '.join(seeds)}): held-out knowledge probe "
                  + " / ".join(f"{x['knowledge/base']:.3f}" for x in sft) + " after pretraining, "
                  + " / ".join(f"{x['knowledge/sft']:.3f}" for x in sft) + " after SFT; "
                  "fabrication rate " + " / ".join(f"{x['fabrication_rate/sft']:.3f}" for x in sft)
                  + " against the demonstrator's " + " / ".join(
                      f"{x['demonstrator/fabrication_rate']:.3f}" for x in sft) + "."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- dpo_beta
def collect_sweep(run_dirs: Sequence[str | Path], dest: str | Path) -> list[Path]:
    """Copy one finished ``sweep.py`` run's ``SWEEP_FILES`` and each cell × seed's summary, config
    and meta (``dest/<cell>/seed<S>``) into ``dest`` (replacing what was there)."""
    if len(run_dirs) != 1:
        raise ValueError(f"a sweep set is one sweep run, got {len(run_dirs)}: {run_dirs}")
    run, dest = Path(run_dirs[0]), Path(dest)
    if not (run / "index.jsonl").exists():
        raise FileNotFoundError(f"{run}: no sweep run (no index.jsonl)")
    rows = [json.loads(x) for x in (run / "index.jsonl").read_text().splitlines() if x]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in SWEEP_FILES:
        shutil.copy(run / name, dest / name)
    return [dest, *(copy_run(run / r["cell"] / f"seed{r['seed']}",
                             dest / r["cell"] / f"seed{r['seed']}") for r in rows)]


def _short(x: float) -> str:
    """``5e-5`` rather than ``5e-05``."""
    return unpad_exponent(f"{x:g}")


def dpo_beta_table(results_dir: str | Path) -> str:
    """DPO's β dependence: one row per β of a sweep (held-out gold, fabrication, accuracy,
    malformed, win rate and exact KL against SFT; mean ± std over the cell's seeds), the SFT they
    all start from, and the training budget, from ``results_dir/<cell>/seed*/``."""
    from rlhf_jax.stages.offline import OfflineConfig

    results_dir = Path(results_dir)
    cells = [c for c in results_dir.iterdir() if c.is_dir() and seed_dirs(c)]
    if not cells:
        raise FileNotFoundError(f"{results_dir}: no <cell>/seed*/summary.json to render")
    runs = {c: [(read_json(d / "summary.json"), read_json(d / "config.json"))
                for d in seed_dirs(c)] for c in cells}
    cfgs = [cfg for rs in runs.values() for _, cfg in rs]
    sft = {json.dumps({k: s[f"{k}/sft"] for k, _ in OFFLINE_COLUMNS}, sort_keys=True)
           for rs in runs.values() for s, _ in rs}
    losses = {cfg["loss"] for cfg in cfgs}
    if len(sft) != 1 or len(losses) != 1:
        raise ValueError(f"{results_dir}: the runs start from {len(sft)} SFT models with losses "
                         f"{sorted(losses)}; a β sweep is one loss from one upstream")
    loss, sft = losses.pop(), json.loads(sft.pop())
    seeds = sorted({d.name[4:] for c in cells for d in seed_dirs(c)}, key=int)
    default = OfflineConfig().beta
    budget = {(c["steps"], c["batch_prompts"], c["optim"]["learning_rate"]) for c in cfgs}
    budget = "; ".join(f"{s} steps of {b} prompts, lr {_short(lr)}" for s, b, lr in sorted(budget))
    first = next(iter(runs.values()))[0][0]
    lines = [f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)} of one `sweep.py "
             f"--script {loss}` run ({budget}{'; mean ± std' if len(seeds) > 1 else ''}; "
             f"files in `{where(results_dir)}/`; rendered by "
             "`python -m rlhf_jax.results update-readme`):", "",
             "| β | " + " | ".join(h for _, h in OFFLINE_COLUMNS)
             + f" | win rate vs SFT (ceiling {first['win_rate/ceiling']:.3f}) "
               "| KL to SFT (nats/seq) |", "|---" * (len(OFFLINE_COLUMNS) + 3) + "|",
             "| SFT | " + " | ".join(cell([sft[k]]) for k, _ in OFFLINE_COLUMNS) + " | — | 0 |"]
    for c in sorted(runs, key=lambda c: runs[c][0][1]["beta"]):
        rs = [s for s, _ in runs[c]]
        beta = {cfg["beta"] for _, cfg in runs[c]}
        if len(beta) != 1:
            raise ValueError(f"{c}: its seeds ran with different β {sorted(beta)}")
        beta = beta.pop()
        keys = [f"{k}/{loss}" for k, _ in OFFLINE_COLUMNS] + [f"{k}/{loss}_vs_sft"
                                                               for k in ("win_rate", "kl")]
        lines.append(f"| {beta:g}" + (" (default)" if beta == default else "") + " | "
                     + " | ".join(cell([r[k] for r in rs]) for k in keys) + " |")
    return "\n".join(lines) + "\n"
