"""Per-token rewards, advantage estimators and whitening, as pure functions over ``[B, N]`` arrays.

Responses are right-padded: ``mask[b, t] = 1`` for generated tokens up to and including EOS. The
episode ends at each row's last counted token, so nothing bootstraps past it (a response cut at
the length budget is treated as finished, and penalised in its score instead).

Advantage estimators share one signature, ``fn(rewards, values, mask, *, discount, gae_lambda,
group_size) -> (advantages, returns)``, and live in :data:`ADVANTAGES`, the plug point for
critic-free variants (GRPO/RLOO add group-relative baselines there).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.ops import AxisName, masked_mean, masked_var


def token_rewards(scores: jax.Array, kl: jax.Array, mask: jax.Array, *,
                  kl_coef: float | jax.Array) -> jax.Array:
    """InstructGPT's per-token reward: ``−β·KL_t`` at every response token, plus the sequence score
    (the RM's) at the last counted token. ``scores [B]``, ``kl [B, N]`` -> ``[B, N]``."""
    mask = mask.astype(kl.dtype)
    n = mask.shape[-1]
    last = n - 1 - jnp.argmax(jnp.flip(mask, axis=-1), axis=-1)             # [B]
    at_last = jax.nn.one_hot(last, n, dtype=kl.dtype) * (jnp.sum(mask, -1, keepdims=True) > 0)
    return (-kl_coef * kl) * mask + scores[:, None] * at_last


def length_residual(scores: jax.Array, lengths: jax.Array, *, axis_name: str | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """``(scores − b·(L − L̄), b)``: the scores with their least-squares linear dependence on the
    response length removed over the batch (b = cov(score, L) / var(L), 0 when every length is
    equal), so a policy gains nothing by lengthening or shortening its responses for a reward
    model that rewards length (the length bias of RMs, Singhal et al. 2023). Moments are over all
    devices' sequences under ``axis_name``. ``scores`` and ``lengths`` are ``[B]``."""
    lengths = lengths.astype(jnp.float32)

    def mean(x):
        m = jnp.mean(x)
        return m if axis_name is None else jax.lax.pmean(m, axis_name)

    dl = lengths - mean(lengths)
    var = mean(dl * dl)
    slope = jnp.where(var > 1e-6, mean(dl * (scores - mean(scores))) / jnp.maximum(var, 1e-6), 0.0)
    return scores - slope * dl, slope


def overlong_penalty(lengths: jax.Array, *, max_length: int, buffer: int) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score: with
    ``L_max = max_length`` and the window ``L_cache = buffer``,

        R_len(|y|) = 0                               if |y| ≤ L_max − L_cache,
                     ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max,
                     −1                              if |y| > L_max.

    ``lengths [B]`` (counted response tokens) -> ``[B]``. A linear ramp from 0 to −1 over the last
    ``buffer`` tokens of the budget."""
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"the overlong window must be in [1, max_length={max_length}], got "
                         f"{buffer}")
    lengths = lengths.astype(jnp.float32)
    start = max_length - buffer
    ramp = jnp.where(lengths > start, (start - lengths) / buffer, 0.0)
    return jnp.where(lengths > max_length, -1.0, ramp)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, discount: float,
        gae_lambda: float, group_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) as a reverse ``lax.scan``:

        δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t,      A_t = δ_t + γλ·m_{t+1}·A_{t+1},

    with ``V_{t+1}`` and ``A_{t+1}`` taken as 0 after the last counted token. Returns
    ``(advantages, returns = advantages + values)`` (returns from *unwhitened* advantages), both
    zero where ``mask`` is 0. ``group_size`` is unused (one signature for every estimator).
    """
    del group_size
    mask = mask.astype(rewards.dtype)
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = rewards + discount * next_values * next_mask - values

    def back(carry, xs):
        delta, m_next = xs
        adv = delta + discount * gae_lambda * m_next * carry
        return adv, adv

    _, adv = lax.scan(back, jnp.zeros_like(rewards[:, 0]), (deltas.T, next_mask.T), reverse=True)
    adv = adv.T * mask
    return adv, (adv + values) * mask


def whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8,
           axis_name: AxisName = None) -> jax.Array:
    """``(x − mean) / std`` over the counted entries of the whole (global) batch; zero elsewhere.
    ``shift_mean=False`` only rescales (keeps the mean)."""
    mean = masked_mean(x, mask, axis_name=axis_name)
    var = masked_var(x, mask, axis_name=axis_name)
    out = (x - mean) * lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.astype(x.dtype)


AdvantageFn = Callable[..., tuple[jax.Array, jax.Array]]
ADVANTAGES: dict[str, AdvantageFn] = {"gae": gae}
