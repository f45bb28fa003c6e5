"""Group-relative advantages (critic-free): GRPO, Dr. GRPO, RLOO, ``best`` (RAFT) and ``pair``
(online DPO), registered in ``ADVANTAGES``.

The iteration samples G responses per prompt (``group_size``); the G samples of a prompt are
consecutive rows (``jnp.repeat`` of the prompts), so a group is a reshape ``[B/G, G]`` of the local
rows and never straddles devices (each device holds whole prompts). Every estimator has the shared
signature ``fn(rewards, values, mask, *, discount, gae_lambda, group_size) -> (advantages,
returns)``; ``discount``, ``gae_lambda`` and ``values`` are unused (no critic, no bootstrapping):
the sequence reward is the sum of the per-token rewards of :func:`token_rewards`,

    R_i = score_i − β·Σ_t KL_{i,t}      (β = 0 when the KL sits in the loss, as in GRPO),

and the advantage ``A_i`` is broadcast over the counted tokens of response ``i``:

* ``grpo`` (Shao et al. 2024, "DeepSeekMath", eq. 3):  A_i = (R_i − mean_g R) / (std_g R + ε), with
  the unbiased (ddof = 1) group std as in common implementations, ε = 1e-4. The KL is GRPO's k3 in
  the loss (``kl_in_loss="k3"``). The iteration divides a loss-side KL by its whitening scale, which
  is 1 with whitening off (always, for these presets): β then weighs the KL against the *std-
  normalised* advantage, which is GRPO's own convention (its β = 0.04 is in those units).
* ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-like training"):  A_i = R_i − mean_g R, no
  std normalisation. Since the mean includes R_i itself, A_i = (G−1)/G · (RLOO's A_i): the gradient
  of E[R] scaled by (G−1)/G, so a loss-side β acts as β·G/(G−1) against the raw reward.
* ``rloo`` (Ahmadian et al. 2024, "Back to basics"; Kool et al. 2019):  A_i = R_i − 1/(G−1)·Σ_{j≠i}
  R_j, the leave-one-out baseline: E[A_i ∇log π(y_i)] = ∇E[R] exactly, with the KL on the reward
  side (k1 per token, summed), so REINFORCE on it ascends E[score] − β·KL(π ‖ π_SFT).
* ``best`` (rejection sampling: RAFT, Dong et al. 2023; Llama 2's rejection-sampling fine-tuning,
  Touvron et al. 2023; ReST-EM, Singh et al. 2023):  A_i = 1 for the member of each group with the
  highest R (the first on a tie), 0 for the others. With REINFORCE's −A·log π this is the SFT loss
  on each prompt's best-of-G sample, and the iteration trains on those rows only
  (:func:`best_rows`): one per prompt, so the token means count the winners' tokens alone.
* ``pair`` (online DPO: OAIF, Guo et al. 2024, with the RM as the annotator as in TRL's online
  DPO; best vs worst of G as in Xiong et al. 2024's iterative DPO):  A_i = +1 for each group's
  highest R, −1 for its lowest, 0 otherwise (the rollout's diagnostics only). The iteration trains
  on each group's (best, worst) pair with the DPO loss against the frozen reference
  (:func:`pair_rows`, ``policy_loss="dpo"``); a group whose R are all equal has no pair (weight 0).

Advantage whitening over the batch is *off* for these (``whiten_advantages=False`` in the presets).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.rl.advantages import ADVANTAGES

GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "best", "pair")
# the advantages whose iteration trains on rows chosen from each group (no ratio, no whitening)
CHOSEN_ROWS = ("best", "pair")
GRPO_EPS = 1e-4


def sequence_rewards(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ_t m·r_t`` per row: ``[B, N] -> [B]``."""
    return jnp.sum(rewards * mask.astype(rewards.dtype), -1)


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
    if x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} rows do not split into groups of {group_size}")
    return x.reshape(-1, group_size)


def _broadcast(adv_seq: jax.Array, values: jax.Array, mask: jax.Array):
    mask = mask.astype(adv_seq.dtype)
    adv = adv_seq.reshape(-1)[:, None] * mask
    return adv, adv + values * mask


def group_relative(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, discount: float,
                   gae_lambda: float, group_size: int, scale_std: bool = True,
                   eps: float = GRPO_EPS) -> tuple[jax.Array, jax.Array]:
    """GRPO's advantage ``(R_i − mean_g R)/(std_g R + ε)`` (``scale_std=False``: Dr. GRPO's
    ``R_i − mean_g R``), broadcast over each response's tokens; ``returns = A + V``."""
    del discount, gae_lambda
    r = _grouped(sequence_rewards(rewards, mask), group_size)
    adv = r - jnp.mean(r, axis=1, keepdims=True)
    if scale_std:
        if group_size < 2:
            raise ValueError("GRPO's group std needs group_size >= 2")
        adv = adv / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
    return _broadcast(adv, values, mask)


def leave_one_out(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, discount: float,
                  gae_lambda: float, group_size: int) -> tuple[jax.Array, jax.Array]:
    """RLOO's advantage ``R_i − mean_{j≠i} R_j`` (= G/(G−1)·(R_i − mean_g R)), broadcast over
    each response's tokens; ``returns = A + V``."""
    del discount, gae_lambda
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs group_size >= 2")
    r = _grouped(sequence_rewards(rewards, mask), group_size)
    others = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
    return _broadcast(r - others, values, mask)


def _best_worst(r: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per group ``[P, G]``: the index of the highest and of the lowest reward (the first of
    equal ones), and 1.0 where they differ."""
    return (jnp.argmax(r, axis=1), jnp.argmin(r, axis=1),
            (jnp.max(r, axis=1) > jnp.min(r, axis=1)).astype(r.dtype))


def best_of_group(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, discount: float,
                  gae_lambda: float, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Rejection sampling's advantage: 1 on each group's highest sequence reward (the first of
    equal ones), 0 elsewhere, broadcast over each response's tokens; ``returns = A + V``."""
    del discount, gae_lambda
    r = _grouped(sequence_rewards(rewards, mask), group_size)
    return _broadcast(jax.nn.one_hot(_best_worst(r)[0], group_size, dtype=r.dtype), values, mask)


def best_rows(data: dict, seq_rewards: jax.Array, example_ids: jax.Array, *, group_size: int
              ) -> tuple[dict, jax.Array]:
    """Each local group's winner (:func:`best_of_group`'s choice): ``data``'s leaves ``[R, ...]``
    cut to ``[R/G, ...]``, and the winners' group ids (``example_ids // G``: global prompt
    indices, so the minibatch split is the same on 1 or N devices). Groups never straddle
    devices, so no collective is needed."""
    r = _grouped(seq_rewards, group_size)
    rows = jnp.arange(r.shape[0]) * group_size + _best_worst(r)[0]
    return jax.tree.map(lambda x: x[rows], data), example_ids[rows] // group_size


def best_and_worst(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, discount: float,
                   gae_lambda: float, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Online DPO's pair as an advantage: +1 on each group's highest sequence reward, −1 on its
    lowest (the first of equal ones; 0 for both when all are equal), 0 elsewhere, broadcast over
    each response's tokens; ``returns = A + V``."""
    del discount, gae_lambda
    r = _grouped(sequence_rewards(rewards, mask), group_size)
    best, worst, differ = _best_worst(r)
    onehot = lambda i: jax.nn.one_hot(i, group_size, dtype=r.dtype)  # noqa: E731
    return _broadcast((onehot(best) - onehot(worst)) * differ[:, None], values, mask)


def pair_rows(data: dict, seq_rewards: jax.Array, example_ids: jax.Array, *, group_size: int
              ) -> tuple[dict, jax.Array, jax.Array]:
    """Each local group's (best, worst) pair (:func:`best_and_worst`'s choice): ``data``'s leaves
    ``[R, ...]`` become ``[R/G, 2, ...]`` (chosen first), with the pairs' weights ``[R/G]`` (0 for
    a group whose rewards are all equal) and group ids (global prompt indices, as
    :func:`best_rows`)."""
    r = _grouped(seq_rewards, group_size)
    best, worst, differ = _best_worst(r)
    base = jnp.arange(r.shape[0]) * group_size
    rows = jnp.stack([base + best, base + worst], axis=1)
    return (jax.tree.map(lambda x: x[rows], data), differ,
            example_ids[base] // group_size)


ADVANTAGES.update({
    "grpo": group_relative,
    "dr_grpo": functools.partial(group_relative, scale_std=False),
    "rloo": leave_one_out,
    "best": best_of_group,
    "pair": best_and_worst,
})
