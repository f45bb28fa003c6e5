"""REINFORCE, the ratio-free policy-gradient loss of RLOO, beside PPO's clipped surrogate
(:func:`rlhf_jax.losses.ppo.clipped_policy_loss`); both share the signature
``(logp, old_logp, advantages, mask, *, clip_eps, clip_eps_high, aggregation, weights,
axis_name) -> (loss, metrics)``
and reduce their token terms with :func:`rlhf_jax.ops.aggregate` (``token``, ``sequence``,
``budget``), globally under ``shard_map``. Both take optional per-token ``weights`` multiplying
their token terms: the truncated importance weights of :func:`tis_weights`.

Notation as in :mod:`rlhf_jax.losses.ppo`: ``logp``, ``old_logp``, ``advantages`` and ``mask`` are
``[B, N]`` over response tokens (N = the response budget ``max_new_tokens``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops import AGGREGATIONS, AxisName, aggregate, masked_mean

__all__ = ["AGGREGATIONS", "aggregate", "reinforce_loss", "tis_weights"]


def reinforce_loss(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
    clip_eps: float = 0.2, clip_eps_high: float | None = None, aggregation: str = "token",
    weights: jax.Array | None = None, axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """REINFORCE (Williams 1992), as RLOO uses it (Ahmadian et al. 2024):

        L = −agg_{i,t} A_{i,t} · log π_θ(y_{i,t}),     ∇L = −agg A·∇log π,

    no ratio and no clipping (``clip_eps``, ``clip_eps_high`` are ignored). The gradient is the on-policy policy
    gradient only while θ is the sampling policy, i.e. with one update per rollout (``epochs = 1,
    minibatches = 1``). With a sequence-level advantage ``A_i`` and ``aggregation="budget"`` the
    loss is ``−1/(B·N) Σ_i A_i Σ_t log π(y_{i,t})`` (REINFORCE on ``Σ_t log π`` scaled by the
    constant ``1/N``). Metrics: ``policy_loss``; ``approx_kl`` and ``ratio`` against the sampling
    policy (0 and 1 on the first update); ``clip_frac`` = 0. ``weights`` (``[B, N]``, no gradient
    taken): per-token factors on ``−A·log π`` (:func:`tis_weights`)."""
    term = -advantages * logp
    if weights is not None:
        term = jax.lax.stop_gradient(weights) * term
    loss = aggregate(term, mask, aggregation=aggregation, axis_name=axis_name)
    log_ratio = jax.lax.stop_gradient(logp - old_logp)
    ratio = jnp.exp(log_ratio)
    return loss, {
        "policy_loss": loss,
        "clip_frac": jnp.zeros(()),
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask, axis_name=axis_name),
        "ratio": masked_mean(ratio, mask, axis_name=axis_name),
    }


def tis_weights(trainer_logp: jax.Array, sampler_logp: jax.Array, *, cap: float) -> jax.Array:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): per-token weights

        w_t = min(π_trainer(y_t) / π_sampler(y_t), C),      C = ``cap``,

    detached. The sampler (cached decoding, possibly another precision or kernel) draws the
    tokens, the trainer's forward pass defines π_old; multiplying each token's policy-gradient
    term by ``w_t`` turns the sampler's expectation back into the trainer's, up to the
    truncation at ``C`` (which bounds the variance). ``[B, N]`` log-probs in, ``[B, N]`` out."""
    log_w = jax.lax.stop_gradient(trainer_logp - sampler_logp)
    return jnp.minimum(jnp.exp(log_w), cap)
