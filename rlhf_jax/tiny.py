"""One shared, cached tiny upstream (pretrain → SFT → preferences + RM) and tiny runs from it, for
notebooks and tests: seconds of work, cached on disk keyed by the config, so every notebook and test
that asks for the same tiny run reuses one. Tiny runs show the plumbing, not the README results.

The cache lives in ``$RLHF_JAX_TINY_DIR`` (default: ``<temp dir>/rlhf_jax_tiny``); each run is
``<cache>/<script>-<hash of its config>``, built under a file lock (two processes asking at once
build it once).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from rlhf_jax import scripts
from rlhf_jax.configs import to_dict
from rlhf_jax.sweep import config_class, parse_tokens

BANNER = "TINY RUN — not the README results"

# the reward script's flags for the tiny upstream (a 1-layer 32-wide model on a 24-person world)
TINY_REWARD = (
    "--sft.pretrain.steps", "30", "--sft.pretrain.batch-size", "8", "--sft.pretrain.seq-len", "32",
    "--sft.pretrain.model.d-model", "32", "--sft.pretrain.model.n-layers", "1",
    "--sft.pretrain.model.n-heads", "2", "--sft.pretrain.task.world.n-real", "12",
    "--sft.pretrain.task.world.n-fictional", "12",
    "--sft.pretrain.task.world.docs-per-person", "2", "--sft.pretrain.log-every", "5",
    "--sft.pretrain.checkpoint-every", "10", "--sft.pretrain.optim.warmup-steps", "5",
    "--sft.steps", "20", "--sft.batch-size", "8", "--sft.ptx-batch-size", "4",
    "--sft.log-every", "5", "--sft.optim.warmup-steps", "5",
    "--steps", "4", "--batch-prompts", "4", "--optim.warmup-steps", "1")
# flags of the tiny runs from it, per script (``reward_dir`` is set to the tiny upstream)
TINY = {
    "ppo": ("--iterations", "4", "--ppo.prompts-per-iter", "8", "--ppo.epochs", "1",
            "--ppo.minibatches", "2", "--policy-optim.warmup-steps", "1",
            "--value-optim.warmup-steps", "1", "--checkpoint-every", "2", "--eval-every", "2",
            # the adaptive entropy controller on (its bound reached by iteration 2), so notebooks
            # show it and its test shares this run
            "--ppo.entropy-target", "4.0", "--ppo.entropy-kp", "0.1", "--ppo.entropy-ki", "0.2",
            "--ppo.entropy-coef-max", "0.05"),
    "dpo": ("--steps", "4", "--batch-prompts", "4", "--optim.warmup-steps", "1",
            "--optim.learning-rate", "1e-3", "--log-every", "1", "--eval-every", "2"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_JAX_TINY_DIR", Path(tempfile.gettempdir()) / "rlhf_jax_tiny"))


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_run(script: str, cfg) -> Path:
    """The run of ``experiments/<script>.py`` with ``cfg`` in the cache: reused when finished,
    else run (or resumed) there."""
    key = hashlib.sha1(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / f"{script}-{key}"
    with _lock(out):
        if not (out / "summary.json").exists():
            scripts.load(script).run(cfg, out)
    return out


def tiny_upstream() -> Path:
    """The shared tiny finished reward run (its SFT model, comparisons and RM)."""
    return cached_run("reward", parse_tokens(config_class("reward"), TINY_REWARD,
                                             what="tiny upstream"))


def tiny_config(script: str, *extra: str):
    """The tiny config of ``script`` (``ppo``, ``grpo``, ``rloo``, ``dpo``) from the shared tiny
    upstream, with ``extra`` flags on top (e.g. ``--loss``, ``my_loss``)."""
    flags = TINY["dpo" if script == "dpo" else "ppo"]
    return parse_tokens(config_class(script),
                        ("--reward-dir", str(tiny_upstream()), *flags, *extra),
                        what=f"tiny {script}")


def tiny_run(script: str = "ppo", *extra: str) -> Path:
    """A cached tiny run of ``script`` from the shared tiny upstream."""
    return cached_run(script, tiny_config(script, *extra))
