"""Adaptive entropy control: the entropy-bonus coefficient steered toward a target mean token
entropy by a bounded PI controller, as a pure state update (its integral term lives in
``PPOState.entropy_coef``, so it is checkpointed and resumes bit-exactly; it reads a global mean,
so N devices update it as one does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def entropy_control(integral: jax.Array, entropy: jax.Array, *, target: float | jax.Array,
                    kp: float | jax.Array, ki: float | jax.Array, max_coef: float | jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """One iteration of a proportional–integral controller on the entropy-bonus coefficient:

        e = H* − H,    c = clip(I + K_p·e, 0, c_max),    I ← clip(I + K_i·e, 0, c_max),

    with ``H`` the mean token entropy of the iteration's rollout (nats per token, the masked mean
    over every device's response tokens: ``rollout/entropy``, measured before the updates that
    use ``c``), ``H* = target``. Returns ``(c, I)``: the coefficient of this iteration's updates
    and the next integral term. The integral alone is dual ascent on the Lagrange multiplier of
    the constraint H ≥ H* (as soft actor-critic's automatic temperature, Haarnoja et al. 2018);
    the policy's entropy integrates the bonus, so an integral term alone oscillates, and the
    proportional term damps it. Both are clipped to [0, c_max] (no windup; the bonus never pushes
    entropy down). Scalars in and out."""
    err = target - entropy
    coef = jnp.clip(integral + kp * err, 0.0, max_coef)
    return coef, jnp.clip(integral + ki * err, 0.0, max_coef)
