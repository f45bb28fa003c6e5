"""A rollout: sample responses with the KV cache, then score them with every model in one pass each
(the policy's pass can be the sampler's own decoding: ``rescore_policy=False``).

``collect`` returns a :class:`Rollout` of ``[B, N]`` token arrays and ``[B]`` sequence arrays. By
default the policy's log-probs are recomputed by a full forward pass at the sampling temperature
(the values PPO's ratio uses); the sampler's own log-probs are kept beside them so their agreement
can be checked (``rollout/logprob_max_diff``; sampling uses no top-k/top-p, so they must agree).
With ``rescore_policy=False`` the policy's logits (and a shared value head) are the ones the
sampler computed while decoding, as in TRL's PPO: one forward pass of the policy fewer per
rollout, equal to the recomputed ones up to float rounding (cached decode = full forward).

The reward model enters as a *score function* ``score(params, tokens, mask) -> [B]`` over
``[prompt | response]`` rows, built by the caller beside the model
(``rlhf_jax.stages.reward_model.make_score_fn``); a bare ``Model`` stands for its ``reward`` head
read at the last token.

The reference model runs once per rollout: the iteration reads its log-probs (and, with
``keep_logits``, the tempered policy and reference logits an exact KL needs) from here.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.losses.reward import reward_at_last_token
from rlhf_jax.models.readout import last_token_rewards
from rlhf_jax.models.functional import Model
from rlhf_jax.ops import entropy_from_logits, kl_per_token, token_logprobs
from rlhf_jax.sampling import SamplingConfig, is_eos, response_logits, sample


class Rollout(NamedTuple):
    prompts: jax.Array         # [B, P] left-padded
    prompt_mask: jax.Array     # [B, P]
    responses: jax.Array       # [B, N] right-padded (pad after EOS)
    mask: jax.Array            # [B, N] generated tokens up to and including EOS
    sampler_logp: jax.Array    # [B, N] log-probs reported by the sampler
    logp: jax.Array            # [B, N] π_old log-probs (full forward, or the sampler's logits)
    ref_logp: jax.Array        # [B, N] π_SFT log-probs
    exact_kl: jax.Array        # [B, N] full-vocabulary KL(π ‖ π_SFT) at each position
    entropy: jax.Array         # [B, N] policy entropy at each position
    values: jax.Array          # [B, N] V(state before token t) (zeros without a critic)
    scores: jax.Array          # [B] raw RM score at the last response token
    truncated: jax.Array       # [B] hit the budget without EOS
    logits: Optional[jax.Array] = None      # [B, N, V] tempered policy logits (keep_logits)
    ref_logits: Optional[jax.Array] = None  # [B, N, V] tempered reference logits (keep_logits)


ScoreFn = Callable[..., jax.Array]   # (params, tokens [B, T], mask [B, T]) -> [B]


def as_score_fn(rm: ScoreFn | Model) -> ScoreFn:
    """``rm`` itself, or for a bare ``Model`` its ``reward`` head read at the last token."""
    return functools.partial(last_token_rewards, rm) if isinstance(rm, Model) else rm


def collect(policy: Model, policy_params, ref: Model, ref_params, score: ScoreFn | Model,
            score_params, value: Model | None, value_params, prompts: jax.Array,
            prompt_mask: jax.Array, key: jax.Array, example_ids: jax.Array, *,
            sampling: SamplingConfig, eos_id: int | tuple[int, ...], pad_id: int, shared_critic: bool = False,
            value_head: str = "value", rescore_policy: bool = True,
            keep_logits: bool = False, sample_from_reference: bool = False) -> Rollout:
    """Sample from ``policy`` and score: policy/reference log-probs, values, RM scores
    (``score(score_params, [prompts | responses], mask)``, see the module docstring).

    The critic: ``value`` (a separate model, ``value_params`` its parameters); with
    ``shared_critic`` the value head of the policy's own pass (the rescoring forward pass, or the
    sampler's decoding with ``rescore_policy=False``; ``value`` must then be None); neither: no
    critic, values 0. ``keep_logits``: also return the tempered logits of both models (for an
    exact KL in the reward or the loss). ``sample_from_reference``: the responses are the
    reference's samples (best-of-N distillation); the policy still scores them (``logp``), and
    ``sampler_logp`` is then the reference's."""
    if shared_critic and value is not None:
        raise ValueError("shared_critic reads the policy's value head; pass value=None")
    if sample_from_reference and not rescore_policy:
        raise ValueError("sampling from the reference needs rescore_policy=True: the policy's "
                         "log-probs come from its own forward pass")
    sampler, sampler_params = (ref, ref_params) if sample_from_reference else (policy,
                                                                               policy_params)
    out = sample(sampler, sampler_params, prompts, prompt_mask, key, cfg=sampling, eos_id=eos_id,
                 pad_id=pad_id, example_ids=example_ids, keep_outputs=not rescore_policy)
    responses, mask = out.tokens, out.mask
    t = sampling.temperature
    if rescore_policy:
        logits, pol_out = response_logits(policy, policy_params, prompts, prompt_mask, responses,
                                          mask)
        pol_scalars = pol_out.scalars
    else:
        logits, pol_scalars = out.logits, out.scalars
    logits = logits / t
    ref_logits, _ = response_logits(ref, ref_params, prompts, prompt_mask, responses, mask)
    ref_logits = ref_logits / t
    logp = token_logprobs(logits, responses)
    ref_logp = token_logprobs(ref_logits, responses)
    exact_kl = kl_per_token(logp, ref_logp, estimator="exact", logits=logits,
                            ref_logits=ref_logits)
    if shared_critic:
        values = pol_scalars[value_head]
    elif value is None:
        values = jnp.zeros_like(logp)
    else:
        _, v_out = response_logits(value, value_params, prompts, prompt_mask, responses, mask,
                                   compute_logits=False)
        values = v_out.scalars[value_head]
    scores = as_score_fn(score)(score_params, jnp.concatenate([prompts, responses], axis=1),
                                jnp.concatenate([prompt_mask, mask], axis=1))
    last = reward_at_last_token(responses, mask)
    truncated = ~is_eos(last, eos_id) | (jnp.sum(mask, -1) == 0)
    m = mask.astype(jnp.float32)
    return Rollout(prompts, prompt_mask, responses, mask, out.logprobs * m, logp * m,
                   ref_logp * m, exact_kl * m, entropy_from_logits(logits) * m, values * m,
                   scores, truncated, *((logits, ref_logits) if keep_logits else ()))
