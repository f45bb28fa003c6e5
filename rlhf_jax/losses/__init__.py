"""Pure loss math over arrays (no models, no configs) plus thin ``loss_fn``s that run the model."""

from rlhf_jax.losses.lm import lm_loss_fn, lm_with_replay_loss_fn, next_token_loss

__all__ = ["lm_loss_fn", "lm_with_replay_loss_fn", "next_token_loss"]
