"""PPO's losses and the KL to the reference policy, as pure functions over arrays.

Notation: ``logp`` = log π(y_t | x, y_<t) under the policy being trained, ``old_logp`` under the
policy that sampled the rollout, ``ref_logp`` under the frozen SFT model π_SFT; all ``[B, N]`` over
response tokens with a ``[B, N]`` mask.

KL to the reference, per token (Schulman's estimators, with ``log r = ref_logp − logp`` and samples
from π):

* ``k1 = −log r = logp − ref_logp`` — unbiased for KL(π ‖ π_SFT); can be negative per sample. It
  splits into the entropy part ``−log π`` (negated: ``logp``) and the cross-entropy-to-SFT part
  ``−log π_SFT``: ``k1 = logp − ref_logp``. This is InstructGPT's reward-side penalty.
* ``k2 = ½ (log r)²`` — biased as a value, but as a *loss* its gradient on on-policy samples is the
  exact ∇KL(π ‖ π_SFT).
* ``k3 = r − 1 − log r`` — unbiased and ≥ 0 per sample (used by GRPO).
* ``exact`` — Σ_v π(v)(log π(v) − log π_SFT(v)) at each position, from the full logits.

As a loss (``kl_in_loss``): k1 has zero expected gradient (E_π[∇ log π] = 0), so it does not
regularise at all; k3's gradient is that of the *forward* KL(π_SFT ‖ π). Use k2 or ``exact``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops import AxisName, masked_mean

KL_ESTIMATORS = ("k1", "k2", "k3", "exact")


def kl_per_token(logp: jax.Array, ref_logp: jax.Array, *, estimator: str = "k1",
                 logits: jax.Array | None = None, ref_logits: jax.Array | None = None
                 ) -> jax.Array:
    """Per-token KL(π ‖ π_SFT) estimate ``[B, N]`` (see the module docstring).

    ``exact`` needs the tempered ``logits`` and ``ref_logits`` ``[B, N, V]`` of the same positions.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "exact":
        if logits is None or ref_logits is None:
            raise ValueError("the exact KL needs logits and ref_logits")
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        lq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
        return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    log_r = ref_logp - logp
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    if estimator == "k3":
        return jnp.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def clipped_policy_loss(
    logp: jax.Array,        # [B, N] log π_θ of the sampled tokens
    old_logp: jax.Array,    # [B, N] log-probs when sampled
    advantages: jax.Array,  # [B, N]
    mask: jax.Array,        # [B, N]
    *,
    clip_eps: float = 0.2,
    axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate (Schulman et al. 2017), a token mean:

        L = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε)),   ρ_t = π_θ / π_old.

    Metrics: ``policy_loss``, ``clip_frac`` (tokens where the clipped term is the active one),
    ``approx_kl`` (k3 estimate of KL(π_old ‖ π_θ)), ``ratio`` mean.
    """
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(pg1, pg2), mask, axis_name=axis_name)
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


def kl_loss(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *, estimator: str = "k2",
            logits: jax.Array | None = None, ref_logits: jax.Array | None = None,
            axis_name: AxisName = None) -> jax.Array:
    """Token mean of the KL penalty used *as a loss* (gradient through ``logp``/``logits`` only).

    Only ``k2`` and ``exact`` have the gradient of KL(π ‖ π_SFT); ``k1`` (zero expected gradient)
    and ``k3`` (forward-KL gradient) are accepted for experiments but documented as wrong.
    """
    ref_logp = jax.lax.stop_gradient(ref_logp)
    ref_logits = None if ref_logits is None else jax.lax.stop_gradient(ref_logits)
    kl = kl_per_token(logp, ref_logp, estimator=estimator, logits=logits, ref_logits=ref_logits)
    return masked_mean(kl, mask, axis_name=axis_name)


def entropy_bonus(entropy: jax.Array, mask: jax.Array, *, axis_name: AxisName = None
                  ) -> jax.Array:
    """Token-mean entropy (subtracted from the loss times ``entropy_coef``)."""
    return masked_mean(entropy, mask, axis_name=axis_name)
