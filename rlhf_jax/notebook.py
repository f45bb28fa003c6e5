"""What the notebooks (``notebooks/``) call beyond plotting: pick a run (or the shared tiny one,
announced as such), pair two policies' held-out answers, train a registered loss against DPO."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rlhf_jax import launch, scripts, tiny
from rlhf_jax.results import RESULTS
from rlhf_jax.runs import Run, load_run
from rlhf_jax.stages.offline import OfflineConfig

launch.enable_compilation_cache()   # as the scripts do: a notebook rerun compiles almost nothing


def run_or_tiny(path: str | Path | None = None, script: str = "ppo") -> Run:
    """The run at ``path``; with none, the shared cached tiny run of ``script`` (printing
    ``tiny.BANNER`` first, so a notebook's first output says it)."""
    if path:
        return load_run(path)
    print(tiny.BANNER, flush=True)   # before any progress line (stderr)
    return load_run(tiny.tiny_run(script))


def committed_or_tiny(seed: int = 0) -> Run:
    """The committed README run ``results/pipeline/seed<seed>`` (summary and trimmed samples), or
    the tiny PPO run (announced) while none is committed."""
    committed = RESULTS / "pipeline" / f"seed{seed}"
    return run_or_tiny(committed if (committed / "summary.json").exists() else None)


def paired_answers(run: Run, a: str = "sft", b: str = "rlhf") -> list[dict]:
    """Policy ``a``'s and ``b``'s held-out answers to the same prompt and sample index, side by side
    (``uid``, ``sample``, ``<a>``, ``<a>_label``, ``<b>``, ``<b>_label``), in ``a``'s order."""
    other = {(r["uid"], r["sample"]): r for r in run.samples(b)}
    return [{"uid": r["uid"], "sample": r["sample"], a: r["response"], f"{a}_label": r["label"],
             b: other[(r["uid"], r["sample"])]["response"],
             f"{b}_label": other[(r["uid"], r["sample"])]["label"]}
            for r in run.samples(a) if (r["uid"], r["sample"]) in other]


def train_offline(loss: str, reward_dir: str | Path | None = None, **loss_args: float) -> Run:
    """An offline run of the preference loss ``loss`` (registered or built in; ``loss_args`` its
    hyperparameters, e.g. DPO's ``beta``) in a fresh directory: from ``reward_dir``'s SFT model and
    comparisons with ``experiments/dpo.py``'s default budget, or with none, from the shared tiny
    SFT model on DPO's tiny budget."""
    if reward_dir:
        cfg = OfflineConfig(loss=loss, reward_dir=str(reward_dir), loss_args=dict(loss_args))
    else:   # the final evaluation only
        args = [str(x) for kv in loss_args.items() for x in kv]
        cfg = tiny.tiny_config("dpo", "--loss", loss, "--eval-every", "0",
                               *(("--loss-args", *args) if args else ()))
    out = Path(tempfile.mkdtemp(prefix=f"rlhf_jax_{loss}_")) / "run"
    scripts.load("dpo").run(cfg, out)
    return load_run(out)
