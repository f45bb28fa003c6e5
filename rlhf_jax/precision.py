"""Model precision: the ``precision`` setting of a model config and the check that bf16 can run.

``"float32"`` (the default) computes everything in float32. ``"bf16"`` is mixed precision:
parameters, optimiser state, gradients, the residual stream, LayerNorm/RMSNorm statistics,
softmax, logits, log-probs and the scalar heads stay float32; only the inputs of the matmuls
(dense layers, attention scores and p·V, the LM head) are cast to bfloat16, and every matmul
accumulates in float32 (``preferred_element_type=float32``).

On a CPU, XLA runs bf16 matmuls natively only with the ``avx512_bf16`` or ``amx_bf16``
instructions; elsewhere it emulates them (PyTorch's emulated bf16 ran ~50x slower than its float32
on such a CPU). Building a bf16 model on a CPU backend without either feature raises a
:class:`~rlhf_jax.configs.ConfigError` naming the missing feature, unless the environment sets
``RLHF_JAX_FORCE_BF16=1``. GPU and TPU backends always pass.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp

from rlhf_jax.configs import check

PRECISIONS = ("float32", "bf16")
BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")   # /proc/cpuinfo flags of native bf16 matmuls
FORCE_ENV = "RLHF_JAX_FORCE_BF16"


def compute_dtype(precision: str):
    """The matmul input dtype of a precision: None (leave float32 untouched) or bfloat16."""
    check(precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {precision!r}")
    return jnp.bfloat16 if precision == "bf16" else None


@functools.cache
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The feature flags of the first CPU in ``path`` (Linux ``/proc/cpuinfo``), or None when
    the file cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def check_precision(precision: str, *, backend: str | None = None,
                    flags: frozenset[str] | None = None,
                    environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``precision="bf16"`` on a CPU backend without native bf16 matmuls.

    ``backend`` defaults to JAX's default backend, ``flags`` to this machine's CPU flags
    (:func:`cpu_flags`), ``environ`` to ``os.environ`` (``RLHF_JAX_FORCE_BF16=1`` skips the
    check); tests pass them to simulate other machines."""
    compute_dtype(precision)                                   # validates the name
    if precision != "bf16":
        return
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return
    environ = os.environ if environ is None else environ
    if environ.get(FORCE_ENV, "") not in ("", "0"):
        return
    flags = cpu_flags() if flags is None else flags
    if flags is not None and any(f in flags for f in BF16_CPU_FEATURES):
        return
    seen = "could not be read" if flags is None else "lists neither"
    check(False, "precision",
          f"bf16 needs a CPU with the {' or '.join(BF16_CPU_FEATURES)} feature for native bf16 "
          f"matmuls; this CPU is missing it (/proc/cpuinfo {seen}), so XLA would emulate bf16, "
          f"far slower than float32. Use precision float32, or set {FORCE_ENV}=1 to run bf16 "
          "anyway.")
