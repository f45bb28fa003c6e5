"""Diagnostics of a PPO rollout, reduced across devices under ``shard_map``: the sampler/trainer
log-prob mismatch, the reward–length correlation and the critic's explained variance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.ops import AxisName, masked_mean, masked_var


def logprob_mismatch(sampler_logp: jax.Array, logp: jax.Array, mask: jax.Array, *,
                     axis_name: AxisName = None) -> dict[str, jax.Array]:
    """How far the sampler's log-probs of the sampled tokens are from π_old's (the trainer's
    forward pass, or the sampler's own logits with ``rescore_policy=False``): the largest and the
    masked mean ``|log π_sampler − log π_old|`` over response tokens of all devices. In float32 both
    are ~1e-6; a different precision or kernel in the sampler shows up here first."""
    diff = jnp.abs(sampler_logp - logp)
    max_diff = jnp.max(diff * mask)
    if axis_name is not None:
        max_diff = lax.pmax(max_diff, axis_name)
    return {"rollout/logprob_max_diff": max_diff,
            "rollout/logprob_mean_diff": masked_mean(diff, mask, axis_name=axis_name)}


def pearson(x: jax.Array, y: jax.Array, axis_name: AxisName = None) -> jax.Array:
    """Pearson correlation of two ``[B]`` arrays over all devices' rows."""
    one = jnp.ones_like(x)
    x = x - masked_mean(x, one, axis_name=axis_name)
    y = y - masked_mean(y, one, axis_name=axis_name)
    sums = [masked_mean(a, one, axis_name=axis_name) for a in (x * y, x * x, y * y)]
    return sums[0] / jnp.maximum(jnp.sqrt(sums[1] * sums[2]), 1e-12)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array,
                       axis_name: AxisName = None) -> jax.Array:
    """1 − Var(returns − values) / Var(returns) over the masked tokens."""
    var_r = masked_var(returns, mask, axis_name=axis_name)
    var_res = masked_var(returns - values, mask, axis_name=axis_name)
    return 1.0 - var_res / jnp.maximum(var_r, 1e-12)
