"""Reading a scalar head out of a sequence: at its last token (the reward model's classic score), or
pooled over a span of tokens (summed or averaged under the mask), beside the model."""

from __future__ import annotations

import jax

from rlhf_jax.ops import last_token_index, masked_mean, masked_sum_and_count


def last_token_rewards(model, params, tokens: jax.Array, mask: jax.Array, *,
                       head: str = "reward") -> jax.Array:
    """Scalar head ``head`` of each row ``tokens [N, T]`` read at its last real token (the last
    position where ``mask`` is 1), ``[N]``.

    The model's last block runs at that one position only (``output_positions``), which is all a
    last-token readout needs: the same reward as reading the full output, for less work. The
    reward model's score function (``rlhf_jax.stages.reward_model.make_score_fn``) builds on it."""
    out = model.apply(params, tokens, attention_mask=mask, compute_logits=False,
                      output_positions=last_token_index(mask)[:, None])
    return out.scalars[head][:, 0]


def pooled_rewards(model, params, tokens: jax.Array, mask: jax.Array, *, start: int,
                   mean: bool = False, head: str = "reward") -> jax.Array:
    """Scalar head ``head`` at every position from ``start`` on (e.g. a response's tokens after a
    fixed-length prompt), summed over the positions where ``mask`` is 1 — or averaged over them
    with ``mean`` (0 for a row with none) — ``[N]``. Padding (mask 0) never counts, and under a
    causal model it cannot change the real positions' values, so a padded row scores as unpadded.
    """
    out = model.apply(params, tokens, attention_mask=mask, compute_logits=False,
                      output_positions=slice(start, None))
    x, m = out.scalars[head], mask[:, start:]
    return masked_mean(x, m, axis=-1) if mean else masked_sum_and_count(x, m, axis=-1)[0]
