"""K responses to one prompt in one forward pass that computes the prompt once.

Preference data holds K responses per prompt (a DPO pair, a K-wise ranking). Concatenating each
response to its own copy of the prompt forwards the prompt K times; here the prompt runs once, its
keys and values land in a KV cache, the cache is repeated K times along the batch and the responses
run as a cached continuation of it (the sampler's prefill, with gradients). Every real position
sees the same keys, values, positions and mask as in the concatenated call, so the outputs are the
same numbers (``tests/test_shared_prompt.py``: equal to float32 rounding, gradients included) for
``(K − 1)·Lp`` fewer token-forwards per prompt, where ``Lp`` is the prompt length. The backward
pass of the repeat sums the K responses' gradients into the one prompt computation.

Rows: prompts ``[P, Lp]`` left-padded, responses ``[P, K, Lr]`` right-padded; the responses'
outputs have ``P·K`` rows, prompt-major (row ``i·K + j`` is response ``j`` of prompt ``i``), as
``jnp.repeat(prompts, K, axis=0)`` beside ``responses.reshape(P·K, Lr)``. Dropout is not applied
(the callers score or train without it).

What it saves is the prompt's share of the work. In-process A/Bs of a train step (both
variants compiled in one process, calls alternating; AVX2 EPYC, 2 cores, 2026-12-07;
``benchmarks/README.md``): DPO with the reference recomputed on the benchmark's shapes (prompt
32, completions 96, K = 2, d 256, 4 layers, vocab 512), 1,234.6 → 1,037.9 ms; the same on the
sentiment task's shapes (prompt 17, responses 24, K = 4, d 128, 2 layers, vocab 8,192), 313.3 →
285.0 ms; the RM's K-wise step there, 71.6 → 58.2 ms.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models.decoder import ModelOutput, Positions, init_cache
from rlhf_jax.models.functional import Model
from rlhf_jax.ops import positions_from_mask, token_logprobs


class SharedOutput(NamedTuple):
    """The two halves of a shared-prompt forward, kept apart: concatenating them would copy the
    largest arrays (logits ``[P·K, Lr, V]``) once more in the forward and in the backward pass."""

    prompt: ModelOutput       # [P, 1, ...]: each prompt's last token (predicts response token 0)
    responses: ModelOutput    # [P·K, T', ...]: the response positions asked for


def shared_prompt_apply(model: Model, params, prompts: jax.Array, prompt_mask: jax.Array,
                        responses: jax.Array, response_mask: jax.Array, *,
                        response_positions: Positions = None,
                        compute_logits: bool = True) -> SharedOutput:
    """The model's outputs over ``[prompt | response]`` rows, the prompt computed once per prompt:
    at each prompt's last token (``[P, 1, ...]``; the same for its K responses) and at the response
    positions ``response_positions`` (None: all ``Lr``; a static slice of ``Lr``; or per-row
    indices ``[P·K, T']`` into the response), where only the last block runs alone, as with the
    model's ``output_positions``. The outputs' ``cache`` is None."""
    p, k, lr = responses.shape
    lp = prompts.shape[1]
    pm = prompt_mask.astype(jnp.bool_)
    head = model.apply(params, prompts, positions=positions_from_mask(pm),
                       cache=init_cache(model.cfg, p, lp, jnp.float32), cache_index=0,
                       kv_mask=pm, compute_logits=compute_logits,
                       output_positions=slice(lp - 1, None))
    rep = lambda a: jnp.repeat(a, k, axis=0)                               # noqa: E731
    # the prompt's keys / values, once per response, with empty slots for the response's own; a
    # float32 cache (attention casts to the matmul dtype itself), so that the backward pass sums
    # the K responses' key / value gradients in float32, as the weight-gradient matmuls of the
    # concatenated call do, not in bf16
    grow = lambda a: jnp.pad(rep(a), ((0, 0), (0, 0), (0, lr), (0, 0)))    # noqa: E731
    cache = tuple((grow(kk), grow(vv)) for kk, vv in head.cache)
    rm = response_mask.reshape(p * k, lr)
    kv_mask = jnp.concatenate([rep(pm), rm.astype(jnp.bool_)], axis=1)     # [P·K, Lp + Lr]
    tail = model.apply(params, responses.reshape(p * k, lr),
                       positions=positions_from_mask(kv_mask)[:, lp:], cache=cache,
                       cache_index=lp, kv_mask=kv_mask, compute_logits=compute_logits,
                       output_positions=response_positions)
    return SharedOutput(head._replace(cache=None), tail._replace(cache=None))


def response_logps_from(out: SharedOutput, responses: jax.Array, response_mask: jax.Array
                        ) -> jax.Array:
    """Summed log-probs ``[P, K]`` of ``responses [P, K, Lr]`` under ``mask`` from the outputs of
    :func:`shared_prompt_apply` with ``response_positions=slice(0, Lr − 1)`` (or wider): token 0
    from the prompt's last position (one log-softmax per prompt), tokens 1… from the responses'
    positions."""
    p, k, lr = responses.shape
    first = jnp.take_along_axis(jax.nn.log_softmax(out.prompt.logits[:, 0].astype(jnp.float32)),
                                responses[:, :, 0].astype(jnp.int32), axis=-1)      # [P, K]
    rest = token_logprobs(out.responses.logits[:, :lr - 1],
                          responses.reshape(p * k, lr)[:, 1:]).reshape(p, k, lr - 1)
    return (jnp.where(response_mask[:, :, 0] > 0, first, 0.0)
            + jnp.sum(jnp.where(response_mask[:, :, 1:] > 0, rest, 0.0), axis=-1))


def shared_prompt_logps(model: Model, params, prompts, prompt_mask, responses, response_mask
                        ) -> jax.Array:
    """Summed log-probs ``[P, K]`` of K responses per prompt: ``sequence_logprob`` of
    ``sampling.response_logits`` over the concatenated rows, the prompt computed once."""
    lr = responses.shape[2]
    out = shared_prompt_apply(model, params, prompts, prompt_mask, responses, response_mask,
                              response_positions=slice(0, lr - 1))
    return response_logps_from(out, responses, response_mask)
