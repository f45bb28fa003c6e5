"""Reading a scalar head where a sequence ends: the reward model's score, beside the model."""

from __future__ import annotations

import jax

from rlhf_jax.ops import last_token_index


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
