"""Array math shared by every loss: masked reductions, token log-probabilities, KL estimators.

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


AGGREGATIONS = ("token", "sequence", "budget")


def aggregate(x: jax.Array, mask: jax.Array, *, aggregation: str = "token",
              axis_name: AxisName = None) -> jax.Array:
    """Reduce a per-token ``[B, N]`` term ``ℓ`` to a scalar (N = the response budget):

    * ``"token"``    — ``Σ_{i,t} m·ℓ / Σ_{i,t} m``: the mean over every counted token of the batch
      (PPO as in InstructGPT / TRL; long responses weigh more). This is :func:`masked_mean`.
    * ``"sequence"`` — ``1/B' Σ_i (1/|o_i|) Σ_t m·ℓ``: the mean over (non-empty) sequences of each
      sequence's token mean; GRPO's ``1/|o_i|`` (Shao et al. 2024, eq. 3). Liu et al. (2025,
      "Dr. GRPO") show it biases towards long wrong answers and short right ones.
    * ``"budget"``   — ``Σ_{i,t} m·ℓ / (B'·N)``: the token sum over the number of (non-empty)
      sequences times the response budget; Dr. GRPO's length-independent normaliser (an empty
      row, e.g. a zero-weight filler of dynamic sampling, is no sequence).

    Global under ``shard_map`` (sums and counts psum-ed over ``axis_name``)."""
    if aggregation == "token":
        return masked_mean(x, mask, axis_name=axis_name)
    mask = mask.astype(x.dtype)
    if aggregation == "sequence":
        tok_sum, tok_count = jnp.sum(x * mask, -1), jnp.sum(mask, -1)
        per_seq = tok_sum / jnp.maximum(tok_count, 1.0)
        return masked_mean(per_seq, tok_count > 0, axis_name=axis_name)
    if aggregation == "budget":
        total, _ = masked_sum_and_count(x, mask, axis_name=axis_name)
        _, n_seq = masked_sum_and_count(mask[:, 0], jnp.any(mask > 0, -1),
                                        axis_name=axis_name)
        return total / (jnp.maximum(n_seq, 1.0) * mask.shape[-1])
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


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


KL_ESTIMATORS = ("k1", "k2", "k3", "iw_k3", "exact")


def kl_per_token(logp: jax.Array | None, ref_logp: jax.Array | None, *, estimator: str,
                 logits: jax.Array | None = None, ref_logits: jax.Array | None = None,
                 old_logp: jax.Array | None = None) -> jax.Array:
    """Per-token estimate ``[B, N]`` of KL(π ‖ π_SFT) from samples of π (Schulman's estimators,
    ``log r = ref_logp − logp``); the one KL function of the library, on the reward side and in
    the loss (:func:`rlhf_jax.losses.ppo.kl_loss`). No default: every caller names its estimator
    (PPO's defaults are documented once, in ``rlhf_jax.rl.ppo.PPOHParams``).

    * ``k1 = −log r = logp − ref_logp`` — unbiased; can be negative per sample. It splits into the
      entropy part ``−log π`` (negated: ``logp``) and the cross-entropy-to-SFT part ``−log π_SFT``.
      InstructGPT's reward-side penalty.
    * ``k2 = ½ (log r)²`` — biased as a value, but as a *loss* its gradient on on-policy samples is
      the exact ∇KL(π ‖ π_SFT).
    * ``k3 = r − 1 − log r`` — unbiased and ≥ 0 per sample (GRPO's).
    * ``iw_k3 = (π/π_old)·(r − 1 − log r)`` — k3 importance-weighted for samples drawn from
      ``π_old`` (``old_logp``, detached), the ratio ``π/π_old`` *not* detached (DeepSeek-AI 2025,
      "DeepSeek-V3.2", the unbiased KL estimate of the loss side): E_{π_old}[iw_k3] = KL(π ‖ π_SFT)
      exactly, so as a loss its expected gradient is the exact ∇KL(π ‖ π_SFT) even after π has
      moved away from the sampler (plain k3 as a loss gives the forward KL's gradient).
    * ``exact`` — ``Σ_v π(v)(log π(v) − log π_SFT(v))`` at each position from the tempered
      ``logits`` and ``ref_logits`` ``[B, N, V]`` (``logp``/``ref_logp`` are not read).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "exact":
        if logits is None or ref_logits is None:
            raise ValueError("the exact KL needs logits and ref_logits")
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        lq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
        return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    log_r = ref_logp - logp
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    k3 = jnp.expm1(log_r) - log_r
    if estimator == "iw_k3":
        if old_logp is None:
            raise ValueError("the importance-weighted k3 needs old_logp (the sampler's log-probs)")
        return jnp.exp(logp - jax.lax.stop_gradient(old_logp)) * k3
    return k3


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
