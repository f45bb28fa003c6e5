"""Array math shared by every loss: masked reductions and token log-probabilities.

Every token-level mean in the library goes through :func:`masked_mean`, which reduces a *sum* and
a *count* and divides once at the end. Under data parallelism the sums and counts are reduced over
the named mesh axis first (``axis_name``), so the mean over a batch split across devices equals the
mean over the whole batch even when shards hold different numbers of counted tokens (a ``pmean``
of per-shard means would not).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

AxisName = str | Sequence[str] | None


def masked_sum_and_count(
    x: jax.Array, mask: jax.Array, *, axis: int | tuple[int, ...] | None = None,
    axis_name: AxisName = None,
) -> tuple[jax.Array, jax.Array]:
    """``(sum(x * mask), sum(mask))`` over ``axis`` (all axes if None), psum-ed over ``axis_name``."""
    mask = mask.astype(x.dtype)
    total = jnp.sum(x * mask, axis=axis)
    count = jnp.sum(mask, axis=axis)
    if axis_name is not None:
        total, count = lax.psum((total, count), axis_name)
    return total, count


def masked_mean(
    x: jax.Array, mask: jax.Array, *, axis: int | tuple[int, ...] | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """Mean of ``x`` over the positions where ``mask`` is true: ``sum(x·m) / max(sum(m), 1)``.

    ``x`` and ``mask`` broadcast together (e.g. ``[B, T]`` tokens with a ``[B, T]`` mask). With
    ``axis=None`` the mean is over *all counted tokens of the batch* (a token mean, not a mean of
    per-sequence means). An all-false mask gives 0, not NaN. With ``axis_name`` the sums and counts
    are reduced across that mesh axis before dividing, so the result is the global mean.
    """
    total, count = masked_sum_and_count(x, mask, axis=axis, axis_name=axis_name)
    return total / jnp.maximum(count, 1.0)


def masked_var(
    x: jax.Array, mask: jax.Array, *, axis_name: AxisName = None, unbiased: bool = False,
) -> jax.Array:
    """Variance of the masked entries of ``x`` (global over ``axis_name``)."""
    mean = masked_mean(x, mask, axis_name=axis_name)
    sq, count = masked_sum_and_count(jnp.square(x - mean), mask, axis_name=axis_name)
    denom = jnp.maximum(count - (1.0 if unbiased else 0.0), 1.0)
    return sq / denom


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log softmax(logits)[targets]``: ``[..., V]`` logits, ``[...]`` int targets -> ``[...]``."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - lse


def sequence_logprob(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed :func:`token_logprobs` over the positions where ``mask`` is set: ``[B, N, V]``
    logits, ``[B, N]`` targets and mask -> ``[B]``."""
    return jnp.sum(jnp.where(mask > 0, token_logprobs(logits, targets), 0.0), axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy ``-Σ p log p`` of ``softmax(logits)`` over the last axis: ``[..., V] -> [...]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids for a left- or right-padded ``[B, T]`` mask: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of the last position where ``mask [B, T]`` is 1 (``T - 1`` for an empty row), ``[B]``."""
    t = mask.shape[-1]
    return (t - 1 - jnp.argmax(jnp.flip(mask.astype(jnp.int32), axis=-1), axis=-1)
            ).astype(jnp.int32)
