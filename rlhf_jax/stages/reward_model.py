"""The reward model as one score function, built beside the model: ``score(params, tokens, mask)``.

The reward model is the policy's trunk with a scalar head read at the last response token
(InstructGPT §3.5), optionally plus the LM-likelihood readout, or a per-token head summed or averaged
over the response tokens (``readout``). Everything that scores a response —
the RM's own loss, the PPO rollout (``rlhf_jax.rl.rollout.collect``), best-of-N and the RM's
evaluation (``rlhf_jax.evaluate``) — calls the function :func:`make_score_fn` returns, so the
readout options live here only and ``rlhf_jax.losses`` keeps only the math. Its ``groups`` twin
scores K responses per prompt with the prompt forwarded once (the RM's K-wise loss uses it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.reward import kwise_bradley_terry_loss
from rlhf_jax.models.functional import Model
from rlhf_jax.models.readout import last_token_rewards, pooled_rewards
from rlhf_jax.ops import (AxisName, last_token_index, masked_mean, masked_sum_and_count,
                          sequence_logprob)
from rlhf_jax.shared_prompt import response_logps_from, shared_prompt_apply

LM_COEF = "reward_lm_coef"
READOUTS = ("last", "sum", "mean")   # where the reward head is read (``make_score_fn``'s readout)


def rm_heads(lm_readout: bool) -> tuple[str, ...]:
    """The RM's scalar heads: ``reward`` (and the LM coefficient's with the LM readout)."""
    return ("reward", LM_COEF) if lm_readout else ("reward",)


def make_score_fn(model: Model, *, prompt_len: int, head: str = "reward",
                  lm_coef_head: str | None = None, lm_stop_grad: bool = False,
                  readout: str = "last"):
    """``score(params, tokens [B, T], mask [B, T]) -> [B]``: the scalar head ``head`` read at each
    ``[prompt | response]`` row's last real token; prompts are left-padded to ``prompt_len``,
    responses right-padded after them.

    ``readout`` ``"sum"`` / ``"mean"`` instead reads the head at every response token (positions
    from ``prompt_len`` on, under ``mask``) and sums / averages it: a reward that is a sum of
    per-token terms (e.g. word valences) need not be reconstructed at one position.

    With ``lm_coef_head`` (the LM-likelihood readout), the score adds ``c · log p(response)``: the
    trunk's own (tied-embedding) LM log-likelihood of the response tokens (``mask`` after
    ``prompt_len``), weighted by the scalar ``c`` that head ``lm_coef_head`` reads at the last
    token (learned; a constant when its kernel is zero). This lets a shallow trunk use knowledge it
    can only express as a next-token prediction (e.g. a recalled fact at the position before the
    stated value), which a readout at the last token alone cannot compare with the stated value.
    ``lm_stop_grad`` keeps the likelihood term from training the trunk (only the coefficient
    learns from it)."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    if readout != "last" and lm_coef_head is not None:
        raise ValueError(f"the LM-likelihood readout adds to a last-token head, not to readout "
                         f"{readout!r}")
    p = prompt_len

    def score(params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        if readout != "last":
            return pooled_rewards(model, params, tokens, mask, start=p, mean=readout == "mean",
                                  head=head)
        if lm_coef_head is None:
            return last_token_rewards(model, params, tokens, mask, head=head)
        # outputs from the last prompt token on (the model's last block runs only there): logits
        # [:, :-1] predict the response tokens; the last real token sits at last_token_index-(p-1)
        out = model.apply(params, tokens, attention_mask=mask, output_positions=slice(p - 1, None))
        logp = sequence_logprob(out.logits[:, :-1], tokens[:, p:], mask[:, p:])
        if lm_stop_grad:
            logp = jax.lax.stop_gradient(logp)
        last = (last_token_index(mask) - (p - 1))[:, None]
        read = lambda h: jnp.take_along_axis(out.scalars[h], last, axis=-1)[:, 0]  # noqa: E731
        return read(head) + read(lm_coef_head) * logp

    def groups(params, prompts: jax.Array, prompt_mask: jax.Array, responses: jax.Array,
               response_mask: jax.Array) -> jax.Array:
        """``score`` of every ``[prompt | response]`` row of ``prompts [P, p]`` (left-padded) and
        ``responses [P, K, Lr]`` (right-padded), ``[P, K]``, each prompt forwarded once
        (:func:`rlhf_jax.shared_prompt.shared_prompt_apply`)."""
        n, k, lr = responses.shape
        args = (model, params, prompts, prompt_mask, responses, response_mask)
        rm = response_mask.reshape(n * k, lr)
        last = last_token_index(rm)[:, None]

        def at_last(out, h, idx):
            """Head ``h`` at each row's last real token (``idx`` into the response outputs); an
            empty response is read at the last prompt token, as the flat ``score`` reads it."""
            x = jnp.take_along_axis(out.responses.scalars[h], idx, axis=-1)[:, 0]
            return jnp.where(rm.any(-1), x, jnp.repeat(out.prompt.scalars[h][:, 0], k))

        if readout == "last" and lm_coef_head is None:   # the last block at that token alone
            out = shared_prompt_apply(*args, response_positions=last, compute_logits=False)
            return at_last(out, head, jnp.zeros_like(last)).reshape(n, k)
        out = shared_prompt_apply(*args, compute_logits=lm_coef_head is not None)
        if readout != "last":
            x = out.responses.scalars[head]
            r = masked_mean(x, rm, axis=-1) if readout == "mean" else masked_sum_and_count(
                x, rm, axis=-1)[0]
            return r.reshape(n, k)
        logp = response_logps_from(out, responses, response_mask).reshape(-1)
        if lm_stop_grad:
            logp = jax.lax.stop_gradient(logp)
        return (at_last(out, head, last) + at_last(out, lm_coef_head, last) * logp).reshape(n, k)

    score.groups = groups
    return score


def kwise_rm_loss_fn(params, batch: dict[str, jax.Array], key: jax.Array | None = None, *,
                     score, margin: float = 0.0, axis_name: AxisName = None):
    """Score every response once, then ``losses.reward.kwise_bradley_terry_loss``.

    ``batch``: ``prompts [P, Lp]``, ``prompt_mask``, ``responses [P, K, Lr]``, ``response_mask``,
    ``ranking [P, K]``, optional ``mask [P, K]`` (1 = response present). With ``score.groups``
    (:func:`make_score_fn`'s) and K > 1, each prompt is forwarded once for its K responses.
    """
    del key
    p, k, lr = batch["responses"].shape
    args = (batch["prompts"], batch["prompt_mask"], batch["responses"], batch["response_mask"])
    if k > 1 and hasattr(score, "groups"):
        rewards = score.groups(params, *args)
    else:
        tokens = jnp.concatenate([jnp.repeat(args[0], k, axis=0), args[2].reshape(p * k, lr)], 1)
        mask = jnp.concatenate([jnp.repeat(args[1], k, axis=0), args[3].reshape(p * k, lr)], 1)
        rewards = score(params, tokens, mask).reshape(p, k)
    return kwise_bradley_terry_loss(rewards, batch["ranking"], mask=batch.get("mask"),
                                    margin=margin, axis_name=axis_name)


def with_frozen(loss_fn, *, trunk: bool, coef_kernel: bool):
    """``loss_fn`` with no gradient into the trunk (everything but ``params["heads"]``) and/or the
    LM coefficient head's kernel (so it stays at its zero initialisation)."""
    def wrapped(params, batch, key=None, **kw):
        sg = jax.lax.stop_gradient
        new = (jax.tree.map(lambda x, f: sg(x) if f else x, params, frozen_trunk(params))
               if trunk else jax.tree.map(lambda x: x, params))
        if coef_kernel:
            new["heads"][LM_COEF]["kernel"] = jax.tree.map(sg, params["heads"][LM_COEF]["kernel"])
        return loss_fn(new, batch, key, **kw)
    return wrapped


def frozen_trunk(params):
    """True for every parameter of the trunk, False for ``params["heads"]``: what
    ``with_frozen(trunk=True)`` keeps out of the gradient (and weight decay must leave alone)."""
    out = jax.tree.map(lambda _: True, params)
    out["heads"] = jax.tree.map(lambda _: False, params["heads"])
    return out


def init_lm_coef(params, value: float):
    """The coefficient head with a zero kernel and bias ``value``: a constant c at the start."""
    heads = params["heads"][LM_COEF]
    heads["kernel"][...] = jnp.zeros_like(heads["kernel"][...])
    heads["bias"][...] = jnp.full_like(heads["bias"][...], value)
    return params


def rm_score_fn(cfg, model: Model, prompt_len: int):
    """The score function of a reward run's RM (``cfg``: a ``RewardConfig``, its readout options
    applied), unjitted."""
    return make_score_fn(model, prompt_len=prompt_len,
                         lm_coef_head=LM_COEF if cfg.lm_readout else None,
                         lm_stop_grad=cfg.lm_stop_grad, readout=cfg.readout)
