"""Autoregressive sampling with a KV cache, compiled as one function.

``sample`` prefills the (left-padded) prompts, then draws ``max_new_tokens - 1`` more tokens in a
``lax.scan``; each step feeds one token through the cached model. Tokens are drawn by inverting the
CDF of the (filtered) next-token distribution with one uniform number per example and step (as
``torch.multinomial`` does), not by Gumbel-max, which needs a random number per vocabulary entry:
on CPU, Gumbel noise and its argmax made decoding ~5% slower. Example ``i``'s uniforms, one per
step, are drawn once before decoding from ``fold_in(key, example_ids[i])``, so an example's sample
does not depend on the batch it sits in, on the batch size, or on how the batch is split over
devices.

Returned log-probabilities are those of the sampled tokens under the distribution actually sampled
from: ``log_softmax(logits / T)`` restricted to the top-k / top-p support and renormalised. With no
top-k/top-p they equal the trainer's ``log_softmax(logits / T)`` from a full forward pass. Greedy
decoding (``temperature == 0``) reports the untempered model log-probs of the argmax tokens.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.configs import check
from rlhf_jax.models.functional import Model
from rlhf_jax.models.decoder import init_cache


# the least nonzero sampling temperature: as T -> 0, logits / T loses float32 precision and
# then overflows (0 is greedy decoding)
MIN_TEMPERATURE = 1e-4


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings.

    Attributes:
      max_new_tokens: response budget; responses that hit it without EOS are truncated.
      temperature: softmax temperature; 0 = greedy.
      top_k: keep the k most likely tokens (0 = off; k ≥ vocabulary keeps all); tokens tied
        with the k-th logit are kept too, as transformers' ``TopKLogitsWarper`` keeps them.
      top_p: nucleus sampling, keep the smallest set with mass >= top_p (1.0 = off).
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        check(self.temperature == 0 or self.temperature >= MIN_TEMPERATURE, "temperature",
              f"must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature} (logits / T "
              "loses float32 precision, then overflows, as T -> 0)")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")


class SampleOutput(NamedTuple):
    tokens: jax.Array     # [B, N] sampled ids, pad_id after EOS
    logprobs: jax.Array   # [B, N] log-prob of each sampled token (0 where mask is 0)
    mask: jax.Array       # [B, N] 1 for generated tokens up to and including EOS
    # with keep_outputs: the model's own (untempered, unfiltered) logits that chose each token,
    # [B, N, V], and its scalar heads at the same positions, {head: [B, N]}; what
    # ``response_logits`` would recompute (after EOS: outputs of the padding fed back in)
    logits: jax.Array | None = None
    scalars: dict[str, jax.Array] | None = None


def filter_logits(logits: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Tempered logits with everything outside the top-k / top-p support set to -inf. ``[..., V]``."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:   # top_k >= V keeps everything
        kth = lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs   # mass strictly above each token
        keep_sorted = mass_before < top_p                    # always keeps the top token
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def choose_tokens(logits, u, cfg: SamplingConfig):
    """One token per row: ``[B, V]`` logits, ``[B]`` uniforms in [0, 1) -> (tokens, logprobs).

    The token is the first whose cumulative probability exceeds ``u`` × the total: an exact draw
    from the filtered distribution. A token outside the top-k / top-p support (probability 0) adds
    nothing to the cumulative sum, so it is never the first to exceed it; nor is a token after the
    last one in the support: ``u < 1``, so ``u × total`` rounds strictly below the total."""
    if cfg.temperature == 0.0:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    else:
        logp = jax.nn.log_softmax(filter_logits(logits, temperature=cfg.temperature,
                                                top_k=cfg.top_k, top_p=cfg.top_p), axis=-1)
        cdf = jnp.cumsum(jnp.exp(logp), axis=-1)                            # [B, V]
        tok = jnp.sum(cdf[:, :-1] <= u[:, None] * cdf[:, -1:], axis=-1).astype(jnp.int32)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def is_eos(tokens: jax.Array, eos_id: int | tuple[int, ...]) -> jax.Array:
    """``tokens == eos_id``, or membership in a tuple of EOS ids."""
    if isinstance(eos_id, int):
        return tokens == eos_id
    return jnp.isin(tokens, jnp.asarray(eos_id, tokens.dtype))


def sample(
    model: Model,
    params,
    prompts: jax.Array,        # [B, P] int, left-padded
    prompt_mask: jax.Array,    # [B, P]
    key: jax.Array,
    *,
    cfg: SamplingConfig,
    eos_id: int | tuple[int, ...],
    pad_id: int,
    example_ids: jax.Array | None = None,   # [B] global example indices (default arange(B))
    keep_outputs: bool = False,
) -> SampleOutput:
    """Sample up to ``cfg.max_new_tokens`` tokens after each prompt (jit this, cfg static).

    ``eos_id`` is one id or a tuple of ids (Llama 3 ends a turn with any of several); a response
    ends at the first of them.

    ``keep_outputs`` also returns every step's logits and scalar heads (``SampleOutput``), so a
    caller can score the samples without a second forward pass (TRL's PPO does this)."""
    b, p = prompts.shape
    n = cfg.max_new_tokens
    check(p + n <= model.cfg.max_len, "max_new_tokens",
          f"prompt length {p} + max_new_tokens {n} exceeds the model context {model.cfg.max_len}")
    if example_ids is None:
        example_ids = jnp.arange(b)
    ex_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, example_ids)      # [B]
    uniforms = jax.vmap(lambda k: jax.random.uniform(k, (n,)))(ex_keys)     # [B, N]
    prompt_mask = prompt_mask.astype(jnp.bool_)
    prompt_len = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)            # [B]

    # slots for the prompt and the n - 1 tokens fed back (the last sampled token never is)
    cache = init_cache(model.cfg, b, p + n - 1)
    kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n - 1), jnp.bool_)], axis=1)  # [B, S]
    out = model.apply(params, prompts, positions=jnp.maximum(jnp.cumsum(prompt_mask, -1) - 1, 0),
                      cache=cache, cache_index=0, kv_mask=kv_mask,
                      output_positions=slice(p - 1, None))   # left-padded: the last prompt token
    tok, logp = choose_tokens(out.logits[:, -1], uniforms[:, 0], cfg)
    done = is_eos(tok, eos_id)

    def step(carry, xs):
        i, u = xs
        cache, kv_mask, prev, done = carry
        kv_mask = kv_mask.at[:, p + i - 1].set(True)
        o = model.apply(params, prev[:, None], positions=(prompt_len + i - 1)[:, None],
                        cache=cache, cache_index=p + i - 1, kv_mask=kv_mask)
        tok, logp = choose_tokens(o.logits[:, 0], u, cfg)
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        new_done = done | is_eos(tok, eos_id)
        return (o.cache, kv_mask, tok, new_done), (tok, jnp.where(live, logp, 0.0), live,
                                                   *_kept(o, 0))

    def _kept(o, t):   # this step's logits and scalars, when kept
        return (o.logits[:, t], {h: v[:, t] for h, v in o.scalars.items()}) if keep_outputs else ()

    first = (tok, logp, jnp.ones((b,), jnp.bool_), *_kept(out, -1))
    if n > 1:
        _, rest = lax.scan(step, (out.cache, kv_mask, tok, done),
                           (jnp.arange(1, n), uniforms[:, 1:].T))
        ys = jax.tree.map(lambda a, r: jnp.concatenate([a[None], r], 0), first, rest)
    else:
        ys = jax.tree.map(lambda a: a[None], first)
    ys = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), ys)                  # [B, N, ...]
    return SampleOutput(ys[0], ys[1], ys[2].astype(jnp.int32), *ys[3:])


def response_logits(model: Model, params, prompts, prompt_mask, responses, response_mask,
                    **kw):
    """Forward over ``[prompt | response]`` read at the ``N`` positions that predict the response
    tokens: returns (logits ``[B, N, V]``, the ``ModelOutput``, whose hidden and scalars are at the
    same positions: ``scalars[h][:, t]`` is the head's value of the state before response token
    ``t``). Prompts left-padded, responses right-padded. Only the last block runs at those
    positions alone (``GPT``'s ``output_positions``)."""
    p = prompts.shape[1]
    tokens = jnp.concatenate([prompts, responses], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    out = model.apply(params, tokens, attention_mask=mask, output_positions=slice(p - 1, -1), **kw)
    return out.logits, out
