"""The experiment scripts (``experiments/*.py``) as importable modules.

Each script is the composition of one experiment: it builds the models, the loss or compiled
iteration, the loop and the evaluation from library pieces, in its ``run(cfg, out)``. A script that
needs another stage first (PPO needs a reward model, which needs SFT) and the pipeline, compare and
sweep drivers call the other scripts' ``run`` through :func:`load` (or :func:`run`, which adds the
stage's start/end lines), so no stage is written twice.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load(name: str) -> ModuleType:
    """The module of ``experiments/<name>.py`` (imported once; later calls return the same one)."""
    mod_name = f"rlhf_jax_experiments.{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    path = EXPERIMENTS / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such experiment script (the experiments/ folder of "
                                "the rlhf_jax checkout; install it with `pip install -e .`)")
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return mod


def name_of(run_fn) -> str:
    """The script name of a script's ``run`` function (its module's last name, or the file's
    stem when the script runs as ``__main__``)."""
    module = getattr(run_fn, "__module__", "") or ""
    if module == "__main__":
        return Path(getattr(sys.modules["__main__"], "__file__", "run")).stem
    return module.rsplit(".", 1)[-1] or "run"


def run(name: str, cfg, out: str | Path) -> dict:
    """``experiments/<name>.py``'s ``run(cfg, out)`` between the stage's start and end lines
    (:func:`rlhf_jax.progress.stage`); returns its summary."""
    from rlhf_jax import progress
    from rlhf_jax.runs import run_locks

    with run_locks(), progress.stage(name, out):   # its run directories are free once it ends
        return load(name).run(cfg, out)
