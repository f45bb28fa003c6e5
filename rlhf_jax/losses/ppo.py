"""PPO's loss terms as pure functions over arrays: the clipped surrogate, the clipped value loss,
the KL to the reference policy as a loss, and the entropy bonus.

Notation: ``logp`` = log π(y_t | x, y_<t) under the policy being trained, ``old_logp`` under the
policy that sampled the rollout, ``ref_logp`` under the frozen SFT model π_SFT; all ``[B, N]`` over
response tokens with a ``[B, N]`` mask. Token terms become scalars with
:func:`rlhf_jax.ops.aggregate` (``token`` mean by default; ``sequence`` for GRPO, ``budget`` for
Dr. GRPO / RLOO). The per-token KL estimators (k1, k2, k3, exact) are
:func:`rlhf_jax.ops.kl_per_token`, used both on the reward side and, through :func:`kl_loss`, in the
loss.

As a loss (``kl_in_loss``): k1 has zero expected gradient (E_π[∇ log π] = 0), so it does not
regularise at all; k3's gradient is that of the *forward* KL(π_SFT ‖ π). Use k2 or ``exact``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops import KL_ESTIMATORS, AxisName, aggregate, kl_per_token, masked_mean

__all__ = ["KL_ESTIMATORS", "clipped_policy_loss", "clipped_value_loss", "entropy_bonus",
           "kl_loss", "kl_per_token"]


def clipped_policy_loss(
    logp: jax.Array,        # [B, N] log π_θ of the sampled tokens
    old_logp: jax.Array,    # [B, N] log-probs when sampled
    advantages: jax.Array,  # [B, N]
    mask: jax.Array,        # [B, N]
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: str = "token",
    weights: jax.Array | None = None,   # [B, N] per-token factors (truncated IS), detached
    axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate (Schulman et al. 2017), reduced with ``aggregation``:

        L = agg_{i,t} max(−A_{i,t}·ρ_{i,t}, −A_{i,t}·clip(ρ_{i,t}, 1 − ε_low, 1 + ε_high)),
        ρ = π_θ / π_old,   ε_low = ``clip_eps``,  ε_high = ``clip_eps_high`` (None: = ε_low).

    A larger ε_high is DAPO's decoupled "clip-higher" (Yu et al. 2025, eq. 10: ε_low 0.2,
    ε_high 0.28): low-probability tokens with A > 0 may gain more before the clip stops them.

    ``aggregation="token"`` is the token mean (PPO); GRPO uses ``"sequence"`` and Dr. GRPO
    ``"budget"`` (:func:`rlhf_jax.ops.aggregate`). Metrics, token means whatever the aggregation:
    ``policy_loss``, ``clip_frac`` (tokens where the clipped term is the active one),
    ``approx_kl`` (k3 estimate of KL(π_old ‖ π_θ)), ``ratio`` mean. ``weights``: per-token
    factors ``w ≥ 0`` on each token's term, ``w·max(−A·ρ, −A·clip(ρ))``, no gradient through them
    (truncated importance sampling, :func:`rlhf_jax.losses.policy_gradient.tis_weights`).
    """
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    pg1 = -advantages * ratio
    high = clip_eps if clip_eps_high is None else clip_eps_high
    pg2 = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    term = jnp.maximum(pg1, pg2)
    if weights is not None:
        term = jax.lax.stop_gradient(weights) * term
    loss = aggregate(term, mask, aggregation=aggregation, axis_name=axis_name)
    sg_ratio = jax.lax.stop_gradient(ratio)
    sg_log_ratio = jax.lax.stop_gradient(log_ratio)
    return loss, {
        "policy_loss": loss,
        "clip_frac": masked_mean((pg2 > pg1).astype(jnp.float32), mask, axis_name=axis_name),
        "approx_kl": masked_mean(sg_ratio - 1.0 - sg_log_ratio, mask, axis_name=axis_name),
        "ratio": masked_mean(sg_ratio, mask, axis_name=axis_name),
    }


def clipped_value_loss(
    values: jax.Array,      # [B, N] V_φ
    old_values: jax.Array,  # [B, N] values when the rollout was scored
    returns: jax.Array,     # [B, N] targets
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss (as in OpenAI's baselines / lm-human-preferences):

        L = ½ mean_t max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²).

    ``clip_eps = 0`` turns clipping off (plain ½ squared error). Metrics: ``value_loss``,
    ``value_clip_frac``.
    """
    err = jnp.square(values - returns)
    if clip_eps > 0:
        clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        err_c = jnp.square(clipped - returns)
        # clipped = the clip moved V and that made the error larger (not a float rounding tie)
        active = (err_c > err) & (jnp.abs(values - old_values) > clip_eps)
        frac = masked_mean(active.astype(jnp.float32), mask, axis_name=axis_name)
        err = jnp.maximum(err, err_c)
    else:
        frac = jnp.zeros(())
    loss = 0.5 * masked_mean(err, mask, axis_name=axis_name)
    return loss, {"value_loss": loss, "value_clip_frac": frac}


def kl_loss(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *, estimator: str,
            aggregation: str = "token", logits: jax.Array | None = None,
            ref_logits: jax.Array | None = None, old_logp: jax.Array | None = None,
            axis_name: AxisName = None) -> jax.Array:
    """The KL penalty used *as a loss*: :func:`rlhf_jax.ops.kl_per_token` reduced with
    ``aggregation`` (GRPO puts ``β·k3`` inside the same ``1/|o_i|`` average as its surrogate);
    gradient through ``logp``/``logits`` only.

    Only ``k2`` and ``exact`` have the gradient of KL(π ‖ π_SFT). ``k1`` (zero expected gradient)
    is accepted for experiments. GRPO's ``k3 = π_SFT/π − 1 − log(π_SFT/π)`` as a loss has the
    expected gradient ``∇KL(π_SFT ‖ π)`` on on-policy samples, the *forward* KL, not the reverse
    KL(π ‖ π_SFT) its value estimates: a mass-covering penalty, weaker against moving probability
    onto tokens π_SFT finds unlikely. ``iw_k3`` (samples from π_old, ``old_logp``) weighs k3 by
    the undetached π/π_old: its expected gradient is the exact ∇KL(π ‖ π_SFT) at any π.
    """
    ref_logp = jax.lax.stop_gradient(ref_logp)
    ref_logits = None if ref_logits is None else jax.lax.stop_gradient(ref_logits)
    # masked positions (padding after EOS) are set to log π = log π_SFT = log π_old before the
    # estimator runs: there the caller's reference log-probs are typically zeroed while the
    # policy's are not, and k3's e^{log π_SFT − log π} overflows to inf for a token the policy
    # finds unlikely (inf·0 = NaN in the masked sum, value and gradient alike)
    counted = mask > 0
    logp = jnp.where(counted, logp, ref_logp)
    if old_logp is not None:
        old_logp = jnp.where(counted, old_logp, ref_logp)
    kl = kl_per_token(logp, ref_logp, estimator=estimator, logits=logits, ref_logits=ref_logits,
                      old_logp=old_logp)
    return aggregate(kl, mask, aggregation=aggregation, axis_name=axis_name)


def entropy_bonus(entropy: jax.Array, mask: jax.Array, *, axis_name: AxisName = None
                  ) -> jax.Array:
    """Token-mean entropy (subtracted from the loss times ``entropy_coef``)."""
    return masked_mean(entropy, mask, axis_name=axis_name)
