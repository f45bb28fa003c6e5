"""Policy-gradient losses with a choice of how token terms are averaged, for PPO, GRPO and RLOO.

Notation as in :mod:`rlhf_jax.losses.ppo`: ``logp``, ``old_logp``, ``advantages`` and ``mask`` are
``[B, N]`` over response tokens (N = the response budget ``max_new_tokens``).

How a per-token term ``ℓ_{i,t}`` becomes a scalar (``aggregation``):

* ``"token"``    — ``Σ_{i,t} m·ℓ / Σ_{i,t} m``: the mean over every counted token of the batch
  (PPO as in InstructGPT / TRL; long responses weigh more).
* ``"sequence"`` — ``1/B' Σ_i (1/|o_i|) Σ_t m·ℓ``: the mean over (non-empty) sequences of each
  sequence's token mean; GRPO's ``1/|o_i|`` (Shao et al. 2024, eq. 3). Liu et al. (2025, "Dr. GRPO")
  show it biases towards long wrong answers and short right ones.
* ``"budget"``   — ``Σ_{i,t} m·ℓ / (B·N)``: the token sum over a constant, the number of sequences
  times the response budget; Dr. GRPO's length-independent normaliser. With a sequence-level
  advantage this is REINFORCE on ``Σ_t log π`` scaled by the constant ``1/N`` (RLOO).

Every reduction is global under ``shard_map`` (sums and counts are psum-ed over ``axis_name``), so
the value is the same on 1 or N devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.ppo import clipped_policy_loss, kl_loss, kl_per_token
from rlhf_jax.ops import AxisName, masked_mean, masked_sum_and_count

AGGREGATIONS = ("token", "sequence", "budget")


def aggregate(x: jax.Array, mask: jax.Array, *, aggregation: str = "token",
              axis_name: AxisName = None) -> jax.Array:
    """Reduce a per-token ``[B, N]`` term to a scalar as ``aggregation`` says (module docstring)."""
    if aggregation == "token":
        return masked_mean(x, mask, axis_name=axis_name)
    mask = mask.astype(x.dtype)
    if aggregation == "sequence":
        tok_sum, tok_count = jnp.sum(x * mask, -1), jnp.sum(mask, -1)
        per_seq = tok_sum / jnp.maximum(tok_count, 1.0)
        return masked_mean(per_seq, tok_count > 0, axis_name=axis_name)
    if aggregation == "budget":
        total, _ = masked_sum_and_count(x, mask, axis_name=axis_name)
        _, n_seq = masked_sum_and_count(mask[:, 0], jnp.ones_like(mask[:, 0]),
                                        axis_name=axis_name)
        return total / (jnp.maximum(n_seq, 1.0) * mask.shape[-1])
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def clipped_loss(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
    clip_eps: float = 0.2, aggregation: str = "token", axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate (Schulman et al. 2017) with a choice of aggregation:

        L = agg_{i,t} max(−A_{i,t}·ρ_{i,t}, −A_{i,t}·clip(ρ_{i,t}, 1 − ε, 1 + ε)),  ρ = π_θ / π_old.

    ``aggregation="token"`` is exactly :func:`rlhf_jax.losses.ppo.clipped_policy_loss`; GRPO uses
    ``"sequence"`` and Dr. GRPO ``"budget"``. The metrics (``clip_frac``, ``approx_kl``, ``ratio``)
    are token means whatever the aggregation."""
    loss, metrics = clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps=clip_eps,
                                        axis_name=axis_name)
    if aggregation == "token":
        return loss, metrics
    ratio = jnp.exp(logp - old_logp)
    per_tok = jnp.maximum(-advantages * ratio,
                          -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps))
    loss = aggregate(per_tok, mask, aggregation=aggregation, axis_name=axis_name)
    return loss, dict(metrics, policy_loss=loss)


def reinforce_loss(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
    clip_eps: float = 0.2, aggregation: str = "token", axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """REINFORCE (Williams 1992), as RLOO uses it (Ahmadian et al. 2024):

        L = −agg_{i,t} A_{i,t} · log π_θ(y_{i,t}),     ∇L = −agg A·∇log π,

    no ratio and no clipping (``clip_eps`` is ignored). The gradient is the on-policy policy
    gradient only while θ is the sampling policy, i.e. with one update per rollout (``epochs = 1,
    minibatches = 1``). With a sequence-level advantage ``A_i`` and ``aggregation="budget"`` the
    loss is ``−1/(B·N) Σ_i A_i Σ_t log π(y_{i,t})``. Metrics: ``policy_loss``; ``approx_kl`` and
    ``ratio`` against the sampling policy (0 and 1 on the first update); ``clip_frac`` = 0."""
    loss = aggregate(-advantages * logp, mask, aggregation=aggregation, axis_name=axis_name)
    log_ratio = jax.lax.stop_gradient(logp - old_logp)
    ratio = jnp.exp(log_ratio)
    return loss, {
        "policy_loss": loss,
        "clip_frac": jnp.zeros(()),
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask, axis_name=axis_name),
        "ratio": masked_mean(ratio, mask, axis_name=axis_name),
    }


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *, estimator: str,
               aggregation: str = "token", logits: jax.Array | None = None,
               ref_logits: jax.Array | None = None, axis_name: AxisName = None) -> jax.Array:
    """The KL-as-a-loss term of :func:`rlhf_jax.losses.ppo.kl_loss` reduced with ``aggregation``
    (GRPO puts ``β·k3`` inside the same ``1/|o_i|`` average as its surrogate).

    Warning, GRPO's ``k3 = π_SFT/π − 1 − log(π_SFT/π)`` as a *loss*: its expected gradient on
    on-policy samples is ``∇KL(π_SFT ‖ π)``, the *forward* KL, not the reverse KL(π ‖ π_SFT) that
    its value estimates; it optimises a forward-KL-like penalty (mass-covering, weaker against
    moving probability onto tokens π_SFT finds unlikely). ``k2`` or ``exact`` give ∇KL(π ‖ π_SFT).
    """
    if aggregation == "token":
        return kl_loss(logp, ref_logp, mask, estimator=estimator, logits=logits,
                       ref_logits=ref_logits, axis_name=axis_name)
    ref_logp = jax.lax.stop_gradient(ref_logp)
    ref_logits = None if ref_logits is None else jax.lax.stop_gradient(ref_logits)
    kl = kl_per_token(logp, ref_logp, estimator=estimator, logits=logits, ref_logits=ref_logits)
    return aggregate(kl, mask, aggregation=aggregation, axis_name=axis_name)
