"""Adaptive entropy control: the entropy-bonus coefficient steered toward a target mean token
entropy, as a pure state update (it lives in ``PPOState.entropy_coef``, so it is checkpointed and
resumes bit-exactly, and it reads a global mean, so N devices update it as one does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def adaptive_entropy_coef(coef: jax.Array, entropy: jax.Array, *, target: float | jax.Array,
                          lr: float | jax.Array, max_coef: float | jax.Array) -> jax.Array:
    """Projected dual ascent on the constraint H ≥ H* (the Lagrange multiplier of a minimum
    entropy, as in soft actor-critic's automatic temperature, Haarnoja et al. 2018), one step per
    iteration:

        c ← clip(c + η·(H* − H), 0, c_max),

    with ``H`` the iteration's mean token entropy of the rollout (nats per token, the masked mean
    over every device's response tokens: ``rollout/entropy``), ``H* = target``, ``η = lr``
    (coefficient per nat of error per iteration) and ``c_max = max_coef``. Below the target the
    bonus grows, above it shrinks to 0 (the bonus never pushes entropy down). Scalars in and out.
    """
    return jnp.clip(coef + lr * (target - entropy), 0.0, max_coef)
