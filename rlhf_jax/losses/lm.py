"""Next-token cross-entropy: pretraining (every corpus token) and SFT (response tokens only).

Both stages are the same math with a different mask: pretraining counts every real token of the
corpus, SFT counts only the demonstration's response tokens (Ouyang et al. 2022, §3.5). The mean is
over all counted tokens of the batch (a token mean), computed with :func:`rlhf_jax.ops.masked_mean`
so it stays exact when the batch is split over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops import AxisName, masked_mean, masked_sum_and_count, token_logprobs


def next_token_loss(
    logits: jax.Array,    # [B, T, V] logits predicting targets
    targets: jax.Array,   # [B, T] int
    mask: jax.Array,      # [B, T] 1 where the target is counted
    *,
    axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean negative log-likelihood ``-Σ m·log p(y_t | y_<t) / Σ m`` over counted tokens.

    Returns ``(loss, metrics)`` with ``loss`` (same value), ``accuracy`` (share of counted tokens
    whose target has the largest logit; the same as argmax = target barring exact ties, and one
    max-reduction instead of an arg-reduction, which is slow on CPU), ``perplexity`` (exp of the
    loss) and ``tokens`` (number of counted tokens).
    """
    logp = token_logprobs(logits, targets)                                  # [B, T]
    loss = -masked_mean(logp, mask, axis_name=axis_name)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    correct = (picked >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    _, count = masked_sum_and_count(logp, mask, axis_name=axis_name)
    metrics = {
        "loss": loss,
        "accuracy": masked_mean(correct, mask, axis_name=axis_name),
        "perplexity": jnp.exp(loss),
        "tokens": count,
    }
    return loss, metrics


def lm_loss_fn(params, batch: dict[str, jax.Array], key: jax.Array | None = None, *, model,
               axis_name: AxisName = None):
    """Forward pass + :func:`next_token_loss` for a batch of ``tokens``, ``attention_mask`` and
    ``loss_mask`` (all ``[B, T]``; ``loss_mask[t]`` counts the prediction of ``tokens[t]``).

    Pretraining batches set ``loss_mask = attention_mask``; SFT batches set it on response tokens.
    ``key`` feeds dropout (ignored when ``model.cfg.dropout == 0``).
    """
    out = model.apply(params, batch["tokens"], attention_mask=batch["attention_mask"],
                      dropout_key=key)
    return next_token_loss(out.logits[:, :-1], batch["tokens"][:, 1:], batch["loss_mask"][:, 1:],
                           axis_name=axis_name)


def lm_with_replay_loss_fn(params, batch: dict[str, dict[str, jax.Array]],
                           key: jax.Array | None = None, *, model, ptx_coef: float,
                           axis_name: AxisName = None):
    """SFT loss on ``batch["sft"]`` plus ``ptx_coef`` × the pretraining loss on ``batch["ptx"]``
    (replayed corpus rows), which keeps pretrained knowledge from being overwritten by the
    demonstrations (the SFT analogue of InstructGPT's PPO-ptx). Metrics: ``loss`` (the total),
    the SFT metrics under their own names and the replay loss as ``ptx_loss``."""
    k1, k2 = (None, None) if key is None else tuple(jax.random.split(key))
    sft_loss, metrics = lm_loss_fn(params, batch["sft"], k1, model=model, axis_name=axis_name)
    ptx_loss, _ = lm_loss_fn(params, batch["ptx"], k2, model=model, axis_name=axis_name)
    total = sft_loss + ptx_coef * ptx_loss
    return total, {**metrics, "sft_loss": sft_loss, "ptx_loss": ptx_loss, "loss": total}
