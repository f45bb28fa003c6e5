"""The sentiment task's exploration tables (README, "A real-text task"), each rendered from
committed KB-sized files under ``results/<set>/<run>/`` (summary, config, meta; ``<run>`` is the
run directory's name, ``<pipeline>/reward`` for a pipeline's reward stage) and one collector for
both:

* ``sentiment_rm`` — reward runs on the same seed's labelled samples: one row per RM readout ×
  steps × learning rate, ``rm/gold_agreement`` overall and on positive-vs-negative pairs;
* ``sentiment_ppo`` — sentiment pipelines (or PPO runs) from the same start and RM: one row per
  PPO KL-control config (β, adaptive target, horizon), start → RLHF gold and positive rate, win
  rate, exact KL, distinct-2, the RM's agreement on the RLHF policy's samples.

Marked: the RM these runs chose (``RM_CHOSEN``), and the task's own PPO (``--method ppo``,
``rlhf_jax.stages.sentiment.PIPELINE.ppo``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from rlhf_jax.results_tables import cell, copy_run, read_json, unpad_exponent, where

STAGES = ("reward", "ppo")          # a run given as a pipeline's stage keeps the pipeline's name
READOUT_ORDER = ("last", "mean", "sum")
READOUT_LABELS = {"last": "last-token head", "mean": "per-token head, mean over response tokens",
                  "sum": "per-token head, sum over response tokens"}


def collect_explore(run_dirs: Sequence[str | Path], dest: str | Path) -> list[Path]:
    """Copy each run's summary, config and meta (a pipeline's from its ``ppo/`` stage) into
    ``dest/<run name>`` (``dest/<pipeline>/reward`` for a pipeline's reward stage); symlinked
    stages are read through."""
    out = []
    for run in map(Path, run_dirs):
        name = f"{run.parent.name}/{run.name}" if run.name in STAGES else run.name
        out.append(copy_run(run, Path(dest) / name))
    return out


def _runs(results_dir: Path) -> list[tuple[str, dict, dict, dict]]:
    """``(run name, summary, config, meta)`` of every ``<run>/summary.json`` under
    ``results_dir``."""
    dirs = sorted(p.parent for p in Path(results_dir).rglob("summary.json"))
    if not dirs:
        raise FileNotFoundError(f"{results_dir}: no <run>/summary.json to render")
    return [(d.relative_to(results_dir).as_posix(), read_json(d / "summary.json"),
             read_json(d / "config.json"), read_json(d / "meta.json")) for d in dirs]


def _same(results_dir: Path, runs: list, what: str, get) -> object:
    """The one value ``get(summary, config, meta)`` takes in every run, else a ValueError: the
    rows of an exploration table compare one knob on the same data."""
    values = {name: get(s, c, m) for name, s, c, m in runs}
    if len(set(map(str, values.values()))) != 1:
        raise ValueError(f"{results_dir}: the runs differ in {what} ({values}); an exploration "
                         "table compares runs on the same data")
    return next(iter(values.values()))


def _lead(results_dir: Path, seed: object, text: str) -> str:
    return (f"Files in `{where(results_dir)}/` (rendered by `python -m rlhf_jax.results "
            f"update-readme`). Seed {seed} in every row, {text}:")


def _lr(x: float) -> str:
    """``5e-4``, ``1.5e-4``: a learning rate as the README writes it."""
    m, _, e = f"{x:e}".partition("e")
    return unpad_exponent(f"{m.rstrip('0').rstrip('.')}e{e}")


# ----------------------------------------------------------------------------- sentiment_rm
# The row these runs chose (2,048 labelled prompts): a last-token head on the trained trunk, 400
# steps at 5e-4. On every train prompt (the default now) the same readout trains 800 steps.
RM_CHOSEN = ("last", 400, 5e-4, False, False)

def _rm_key(cfg: dict) -> tuple:
    """What a reward run's row varies: readout, steps, learning rate, frozen trunk, LM readout
    (a config without ``readout`` predates the option: a last-token head)."""
    return (cfg.get("readout", "last"), cfg["steps"], cfg["optim"]["learning_rate"],
            cfg["freeze_trunk"], cfg["lm_readout"])


def sentiment_rm_table(results_dir: str | Path) -> str:
    """One row per reward run: readout (the chosen one's in bold), steps, learning rate, held-out
    ``rm/gold_agreement`` (the highest in bold) and on positive-vs-negative pairs; the runs must
    share the seed, the labelled samples and the held-out pairs."""
    results_dir = Path(results_dir)
    runs = _runs(results_dir)
    seed = _same(results_dir, runs, "seed", lambda s, c, m: m["seed"])
    prompts = _same(results_dir, runs, "train prompts", lambda s, c, m: s[
        "preferences/train_prompts"])
    k = _same(results_dir, runs, "samples per prompt", lambda s, c, m: c["labeler"]["k"])
    pairs = _same(results_dir, runs, "held-out pairs", lambda s, c, m: s["rm/gold_pairs"])
    ceiling = _same(results_dir, runs, "noise ceiling", lambda s, c, m: s["rm/noise_ceiling"])
    runs.sort(key=lambda x: (READOUT_ORDER.index(_rm_key(x[2])[0]), _rm_key(x[2]) != RM_CHOSEN,
                             x[2]["steps"], -x[2]["optim"]["learning_rate"]))
    best = max(s["rm/gold_agreement"] for _, s, _, _ in runs)
    lines = [_lead(results_dir, seed, f"the same {prompts:,} × {k} labelled samples, "
                   "`rm/gold_agreement` on held-out starting-policy samples "
                   f"({pairs:,} pairs with different compounds; label noise ceiling "
                   f"{ceiling:.3f})"), "",
             "| RM readout (`--pipeline.reward.…`) | steps | lr | `rm/gold_agreement` "
             "| positive vs negative pairs | run |", "|---|---|---|---|---|---|"]
    shown = set()
    for name, s, c, _ in runs:
        readout, steps, lr, frozen, lm = key = _rm_key(c)
        label = READOUT_LABELS[readout] + (", frozen trunk" if frozen else "") + (
            " + LM-likelihood readout" if lm else "")
        label = f"**{label}**" if key == RM_CHOSEN else label
        if readout not in shown or key == RM_CHOSEN:
            label += f" (`readout {readout}`" + (", chosen" if key == RM_CHOSEN else "") + ")"
        shown.add(readout)
        agree = cell([s["rm/gold_agreement"]])
        agree = f"**{agree}**" if agree == cell([best]) else agree
        lines.append(f"| {label} | {steps} | {_lr(lr)} | {agree} | "
                     f"{cell([s['rm/gold_agreement/positive_vs_negative']])} | `{name}` |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- sentiment_ppo
def _ppo_label(cfg: dict, summary: dict) -> str:
    """``β 0.1 (final 0.092), adaptive to 1.75, horizon 2,000`` from the run's PPO config, then
    the KL stop and the iterations run (``…, stop at KL 2.5: 31 of 60 iterations``)."""
    h = cfg["ppo"]
    if h.get("advantage") in ("best", "pair"):   # RAFT, online DPO: β only ranks (score − β·Σk1)
        epochs = f"{h['epochs']} epoch" + "s" * (h["epochs"] > 1)
        if h["minibatches"] > 1:
            epochs += f" × {h['minibatches']} minibatches"
        whose = "the start's" if h.get("sample_from") == "reference" else "the policy's"
        label = (f"RAFT: SFT on the RM's best of {h['group_size']} samples per prompt"
                 if h["advantage"] == "best" else
                 f"online DPO (β {h['dpo_beta']:g}): the RM's best vs worst of "
                 f"{h['group_size']} samples per prompt")
        label += (f" ({whose}), {h['prompts_per_iter']} prompts × {epochs} per iteration, "
                  "ranked by " + (f"score − {h['kl_coef']:g}·KL" if h["kl_coef"] else
                                  "the RM score alone"))
    elif not h["adaptive_kl"]:
        label = f"β {h['kl_coef']:g} (fixed)"
    else:
        label = (f"β {h['kl_coef']:g} (final {summary['final/kl/coef']:.3f}), adaptive to "
                 f"{h['kl_target']:g}, horizon {h['kl_horizon']:,.0f}")
    if h.get("advantage", "gae") not in ("gae", "best", "pair"):
        label += (f", {h['advantage']} advantage over {h['group_size']} samples per prompt, "
                  f"critic {h['critic']}")
    elif h.get("gae_lambda", 0.95) != 0.95:
        label += f", GAE λ {h['gae_lambda']:g}"
    lr = cfg.get("policy_optim", {}).get("learning_rate")
    if lr is not None and lr != 5e-5:
        label += f", policy lr {_lr(lr)}"
    if h.get("length_debias"):
        label += ", length-debiased reward"
    if h.get("no_eos_penalty"):
        label += f", {h['no_eos_penalty']:g} off a response without EOS"
    if cfg.get("kl_stop"):
        label += (f", stop at KL {cfg['kl_stop']:g}: {summary.get('ppo/iterations_run', '?')} of "
                  f"{cfg['iterations']} iterations")
    return label


def _is_task_ppo(cfg: dict, ppo) -> bool:
    """The run's PPO stage is the task's own (``ppo``, ``PIPELINE.ppo``: ``sentiment.py --method
    ppo``): every algorithm field (absent from an older config = the field's default), the
    iterations, the KL stop and the policy's learning rate."""
    want = dataclasses.asdict(ppo.ppo)
    return (all(cfg["ppo"].get(k, v) == v for k, v in want.items())
            and (cfg["iterations"], cfg.get("kl_stop", 0.0)) == (ppo.iterations, ppo.kl_stop)
            and cfg["policy_optim"]["learning_rate"] == ppo.policy_optim.learning_rate)


def sentiment_ppo_table(results_dir: str | Path) -> str:
    """One row per PPO run from the same start and RM (the task's own PPO, ``--method ppo``,
    marked), by adaptive KL target then horizon: held-out
    gold and positive rate start → RLHF, win rate and exact KL vs the start (bold where the run's
    ``bar/win_rate`` / ``bar/kl`` is met), distinct-2 start / RLHF, the RM's agreement with the
    judge on the RLHF policy's samples."""
    from rlhf_jax.stages.sentiment import PIPELINE

    results_dir = Path(results_dir)
    runs = _runs(results_dir)
    seed = _same(results_dir, runs, "seed", lambda s, c, m: m["seed"])
    for key in ("gold/sft", "rm/gold_agreement"):
        _same(results_dir, runs, f"`{key}`", lambda s, c, m: s[key])
    budget = _same(results_dir, runs, "`kl/budget`", lambda s, c, m: s["kl/budget"])
    runs.sort(key=lambda x: (x[2]["ppo"]["kl_target"], x[2]["ppo"]["kl_horizon"]))
    lines = [_lead(results_dir, seed, "one run each from the same start and RM; in bold: the "
                   f"win-rate bar (0.60) or the KL budget ({budget:g} nats/seq) met"), "",
             "| PPO config | gold start → RLHF | positive rate start → RLHF | win rate "
             "| KL (nats/seq, exact) | distinct-2 start / RLHF | RM agreement on RLHF samples "
             "| run |", "|---" * 8 + "|"]
    for name, s, c, _ in runs:
        label = ("**`--method ppo`**: " if _is_task_ppo(c, PIPELINE.ppo) else "") + _ppo_label(
            c, s)
        win, kl = cell([s["win_rate/rlhf_vs_sft"]]), cell([s["kl/rlhf_vs_sft"]], 2)
        win = f"**{win}**" if s.get("bar/win_rate") else win
        kl = f"**{kl}**" if s.get("bar/kl") else kl
        lines.append(" | ".join([
            f"| {label}", *(f"{cell([s[f'{m}/sft']])} → {cell([s[f'{m}/rlhf']])}"
                            for m in ("gold", "positive_rate")), win, kl,
            f"{cell([s['distinct_2/sft']])} / {cell([s['distinct_2/rlhf']])}",
            cell([s["rm/gold_agreement_on_policy"]]), f"`{name}` |"]))
    return "\n".join(lines) + "\n"
