"""Reward-model losses: Bradley–Terry on pairs and InstructGPT's K-wise batching.

Bradley–Terry: P(y_w ≻ y_l | x) = σ(r(x, y_w) − r(x, y_l)), so the negative log-likelihood of a
labelled pair is ``−log σ(r_w − r_l − margin)`` (``margin`` optional, Touvron et al. 2023).

K-wise (Ouyang et al. 2022, eq. 1): a labeller ranks K responses to one prompt; every one of the
C(K, 2) comparisons enters the loss, each response is forwarded once, and the prompt's loss is
divided by C(K, 2) so every prompt counts once whatever its K:

    loss(x) = −1/C(K,2) · Σ_{i,j: rank_i > rank_j} log σ(r_i − r_j − margin)

Ties (equal ranking scores) contribute nothing. With K = 2 and no tie this equals the pairwise loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops import AxisName, last_token_index, masked_mean, masked_sum_and_count


def bradley_terry_loss(
    r_chosen: jax.Array,     # [N] rewards of preferred responses
    r_rejected: jax.Array,   # [N]
    *,
    margin: float | jax.Array = 0.0,
    mask: jax.Array | None = None,   # [N] 1 = pair counted
    axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over the pairs where ``mask`` is 1 of ``−log σ(r_chosen − r_rejected − margin)``.

    Metrics: ``loss``, ``accuracy`` (share with r_chosen > r_rejected), ``margin`` (mean
    r_chosen − r_rejected), ``reward_mean``/``reward_std`` over both responses of counted pairs.
    """
    if mask is None:
        mask = jnp.ones_like(r_chosen)
    diff = r_chosen - r_rejected
    loss = masked_mean(-jax.nn.log_sigmoid(diff - margin), mask, axis_name=axis_name)
    return loss, {
        "loss": loss,
        "accuracy": masked_mean((diff > 0).astype(jnp.float32), mask, axis_name=axis_name),
        "margin": masked_mean(diff, mask, axis_name=axis_name),
        **_reward_stats(jnp.stack([r_chosen, r_rejected]), jnp.stack([mask, mask]), axis_name),
    }


def _reward_stats(rewards, mask, axis_name) -> dict[str, jax.Array]:
    """Global mean and std of the counted rewards."""
    mean = masked_mean(rewards, mask, axis_name=axis_name)
    var = masked_mean(jnp.square(rewards - mean), mask, axis_name=axis_name)
    return {"reward_mean": mean, "reward_std": jnp.sqrt(var)}


def kwise_bradley_terry_loss(
    rewards: jax.Array,   # [P, K] one reward per response
    ranking: jax.Array,   # [P, K] labeller's ranking scores: higher = preferred, equal = tie
    *,
    mask: jax.Array | None = None,   # [P, K] 1 = response present (K may vary per prompt)
    margin: float | jax.Array = 0.0,
    axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """InstructGPT's K-wise loss (module docstring): mean over prompts with at least two present
    responses (``mask``) of the per-prompt sum over ranked pairs, each prompt's sum divided by its
    C(K, 2).

    Metrics: ``loss``, ``accuracy`` and ``margin`` over all untied pairs, ``reward_mean`` and
    ``reward_std`` over present responses, ``pairs`` (untied pairs counted).
    """
    valid = jnp.ones_like(rewards) if mask is None else mask.astype(rewards.dtype)
    diff = rewards[:, :, None] - rewards[:, None, :]                       # [P, K, K] r_i − r_j
    pair_ok = valid[:, :, None] * valid[:, None, :]
    better = (ranking[:, :, None] > ranking[:, None, :]).astype(rewards.dtype) * pair_ok
    k = jnp.sum(valid, axis=-1)                                             # [P]
    n_pairs = jnp.maximum(k * (k - 1) / 2, 1.0)                            # C(K, 2)
    per_prompt = jnp.sum(-jax.nn.log_sigmoid(diff - margin) * better, axis=(1, 2)) / n_pairs
    prompt_ok = (k >= 2).astype(rewards.dtype)
    loss = masked_mean(per_prompt, prompt_ok, axis_name=axis_name)
    _, pairs = masked_sum_and_count(diff, better, axis_name=axis_name)
    return loss, {
        "loss": loss,
        "accuracy": masked_mean((diff > 0).astype(rewards.dtype), better, axis_name=axis_name),
        "margin": masked_mean(diff, better, axis_name=axis_name),
        **_reward_stats(rewards, valid, axis_name),
        "pairs": pairs,
    }


def reward_at_last_token(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``values[b, t_last(b)]`` with ``t_last`` the last position where ``mask`` is 1 (the EOS,
    or the last token of a truncated response): ``[B, T], [B, T] -> [B]``."""
    return jnp.take_along_axis(values, last_token_index(mask)[:, None], axis=-1)[:, 0]
