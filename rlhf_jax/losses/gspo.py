"""GSPO, the sequence-level importance ratio (Zheng et al. 2025, "Group Sequence Policy
Optimization"), beside PPO's per-token ratio (:func:`rlhf_jax.losses.ppo.clipped_policy_loss`);
same signature ``(logp, old_logp, advantages, mask, *, clip_eps, clip_eps_high, aggregation,
weights, axis_name) -> (loss, metrics)``, all arrays ``[B, N]`` over response tokens.

The ratio of a response is the geometric mean of its token ratios over its ``|y_i|`` *real*
tokens (the mask's count, never the padded length N):

    s_i = exp( 1/|y_i| Σ_t m_{i,t} (log π_θ(y_{i,t}) − log π_old(y_{i,t})) ),

clipped per sequence with the paper's small range (ε_low 3e-4, ε_high 4e-4; at PPO's 0.2 the clip
would never act on a length-normalised ratio).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops import AxisName, aggregate, masked_mean

__all__ = ["gspo_loss", "gspo_token_loss", "sequence_log_ratio"]


def sequence_log_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """``log s_i = Σ_t m (logp − old_logp) / |y_i|``: ``[B, N] -> [B]`` (0 for an empty row)."""
    mask = mask.astype(logp.dtype)
    return jnp.sum((logp - old_logp) * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def _clip(ratio, clip_eps, clip_eps_high):
    high = clip_eps if clip_eps_high is None else clip_eps_high
    return jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)


def _metrics(loss, clipped, present, log_s, axis_name):
    s = jnp.exp(jax.lax.stop_gradient(log_s))
    return {"policy_loss": loss,
            "clip_frac": masked_mean(clipped.astype(jnp.float32), present, axis_name=axis_name),
            "approx_kl": masked_mean(s - 1.0 - jax.lax.stop_gradient(log_s), present,
                                     axis_name=axis_name),
            "ratio": masked_mean(s, present, axis_name=axis_name)}


def gspo_loss(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
    clip_eps: float = 3e-4, clip_eps_high: float | None = 4e-4, aggregation: str = "sequence",
    weights: jax.Array | None = None, axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GSPO (Zheng et al. 2025, eq. 5–7):

        L = −1/B' Σ_i min(s_i·A_i, clip(s_i, 1 − ε_low, 1 + ε_high)·A_i),

    the mean over the B' non-empty sequences (global under ``axis_name``), ``A_i`` the token mean
    of ``advantages`` over the response (the group advantage, broadcast over its tokens).
    ``aggregation`` must be ``"sequence"`` (the method is defined per sequence); ``weights``
    (per-token importance factors) are refused. Metrics: ``clip_frac`` = share of *sequences*
    clipped, ``ratio`` = mean ``s_i``, ``approx_kl`` = mean ``s_i − 1 − log s_i``."""
    if aggregation != "sequence":
        raise ValueError(f"GSPO averages over sequences: aggregation must be 'sequence', got "
                         f"{aggregation!r}")
    if weights is not None:
        raise ValueError("GSPO's ratio is per sequence: per-token weights (tis_cap) do not apply")
    m = mask.astype(logp.dtype)
    count = jnp.sum(m, -1)                                                    # [B] |y_i|
    present = count > 0
    adv = jnp.sum(advantages * m, -1) / jnp.maximum(count, 1.0)               # [B] A_i
    log_s = sequence_log_ratio(logp, old_logp, mask)                          # [B]
    s = jnp.exp(log_s)
    pg1, pg2 = -adv * s, -adv * _clip(s, clip_eps, clip_eps_high)
    loss = masked_mean(jnp.maximum(pg1, pg2), present, axis_name=axis_name)
    return loss, _metrics(loss, pg2 > pg1, present, log_s, axis_name)


def gspo_token_loss(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
    clip_eps: float = 3e-4, clip_eps_high: float | None = 4e-4, aggregation: str = "sequence",
    weights: jax.Array | None = None, axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GSPO-token (Zheng et al. 2025, eq. 13–14): per-token advantages with the sequence ratio's
    value,

        s_{i,t} = sg[s_i] · π_θ(y_{i,t}) / sg[π_θ(y_{i,t})],
        L = agg_{i,t} max(−A_{i,t}·s_{i,t}, −A_{i,t}·clip(s_{i,t}, 1 − ε_low, 1 + ε_high)),

    reduced with ``aggregation`` (the paper's: ``sequence``, 1/|y_i| per response). ``s_{i,t}``
    equals ``s_i`` in value, and its gradient is ``s_i ∇log π(y_{i,t})``: with advantages equal
    across a response's tokens and ``sequence`` aggregation the gradient is GSPO's exactly.
    ``weights``: per-token factors, detached. Metrics as :func:`gspo_loss` (``clip_frac`` over
    tokens)."""
    log_s = jax.lax.stop_gradient(sequence_log_ratio(logp, old_logp, mask))  # [B]
    log_st = log_s[:, None] + logp - jax.lax.stop_gradient(logp)             # [B, N]
    s = jnp.exp(log_st)
    pg1, pg2 = -advantages * s, -advantages * _clip(s, clip_eps, clip_eps_high)
    term = jnp.maximum(pg1, pg2)
    if weights is not None:
        term = jax.lax.stop_gradient(weights) * term
    loss = aggregate(term, mask, aggregation=aggregation, axis_name=axis_name)
    m = _metrics(loss, pg2 > pg1, mask, log_st, axis_name)
    return loss, m
