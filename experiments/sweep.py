"""A sweep: one experiment script over a grid (or list) of config overrides × seeds; each cell ×
seed a resumable run directory ``<out>/<cell>/seed<S>``, one ``index.jsonl`` and ``results.md``.
Every override is checked against the script's config before any run starts; a killed sweep
resumes where it stopped (finished runs reused, an interrupted run resumed from its checkpoint).

    python experiments/sweep.py --out runs/kl-sweep --script ppo \
        --grid ppo.kl-coef=0.02,0.05,0.1 --seeds 0 1 -- --reward-dir runs/pipeline/reward
    python experiments/sweep.py --out runs/dpo-beta --script dpo \
        --cells "beta=0.1" "beta=0.3 optim.learning-rate=1e-4" -- --reward-dir runs/reward
"""

from rlhf_jax import launch

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

import dataclasses
from pathlib import Path

from rlhf_jax import cli, progress
from rlhf_jax.runs import RunDir
from rlhf_jax.sweep import SweepConfig, results_table, run_cells, sweep_cells


# sweep fields a rerun on the same directory may change: other seeds, cells, grid values, metrics
EXTENDABLE = frozenset({"seeds", "grid", "cells", "metrics"})


def run(cfg: SweepConfig, out: str | Path) -> dict:
    """Every cell × seed of ``cfg`` into ``out`` (validated first); returns the summary: the
    number of runs and the index."""
    cells = sweep_cells(cfg)          # a bad override fails here, before any run
    run = RunDir(out)
    changed = run.write_config(cfg, may_change=EXTENDABLE)   # each cell keeps its own claim
    if changed:
        progress.message(f"sweep: {out} rerun with other {', '.join(changed)}; finished cells "
                         "are reused, the index lists this command's cells and seeds")
    run.write_meta(seed=min(cfg.seeds))
    rows = run_cells(cells, cfg.seeds, out, metrics=cfg.metrics, table=results_table)
    summary = {"runs": len(rows), "cells": [c.name for c in cells], "index": str(Path(out) /
                                                                                 "index.jsonl")}
    run.write_summary(summary)
    return summary


def main(argv=None) -> dict:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    base = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    return cli.main(SweepConfig, run, argv, description=__doc__,
                    default=dataclasses.replace(SweepConfig(), base=tuple(base)))


if __name__ == "__main__":
    main()
