"""What every decoder in ``models/`` shares: the output type, the KV cache, the attention mask and
positions of a (cached) call, position selection, dropout, and the loop over blocks.

A model family (``gpt2.GPT``, ``llama.Llama``) supplies its embedding, blocks and final norm; the
call convention, padding rules and cache layout are the same for both, so the sampler, the losses
and the stages work on either. The KV cache is a tuple with one ``(k, v)`` pair per layer, each
``[B, H_kv, S, K]`` (only the key/value heads: grouped-query models keep fewer), written in place with
``lax.dynamic_update_slice`` (per-layer arrays are ~2x faster than one stacked array on CPU,
``../shared/bench/CPU-NOTES.md``). It is an argument and a return value, never module state, so
jitted code stays a pure function of ``(params, tokens, cache)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.models.dense import dense
from rlhf_jax.ops import positions_from_mask

KVCache = tuple[tuple[jax.Array, jax.Array], ...]
Positions = slice | jax.Array | None   # a static slice of T, or per-row indices [B, T']


class ModelOutput(NamedTuple):
    logits: jax.Array | None         # [B, T, V] float32, or None when not requested
    hidden: jax.Array                # [B, T, D] final-norm output
    scalars: dict[str, jax.Array]    # head name -> [B, T]
    cache: KVCache | None            # updated cache when one was passed in
    # With ``output_positions`` the T axis of logits / hidden / scalars holds only those positions.


def take_positions(x: jax.Array, positions: Positions) -> jax.Array:
    """``x [B, T, ...]`` at ``positions``: all (None), a static slice, or indices ``[B, T']``."""
    if positions is None:
        return x
    if isinstance(positions, slice):
        return x[:, positions]
    idx = positions.astype(jnp.int32).reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def init_cache(cfg, batch: int, length: int, dtype=None) -> KVCache:
    """An empty KV cache for a model config: per layer a ``(k, v)`` pair of zeros
    ``[B, H_kv, S, K]`` (``cfg.kv_heads`` key/value heads of ``cfg.head_dim``), by default in the
    model's matmul dtype (bfloat16 under ``precision="bf16"``, else float32). Attention casts keys
    and values to that dtype anyway, so a bf16 cache gives the same numbers as a float32 one (and
    as the uncached forward) in half the memory."""
    dtype = dtype or getattr(cfg, "matmul_dtype", None) or jnp.float32
    shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers))


def mask_and_positions(tokens, attention_mask, positions, cache, cache_index, kv_mask):
    """``(mask [B, T, S] bool, positions [B, T])`` of a call: causal over valid slots.

    Without a cache, slots are the tokens themselves (``attention_mask`` marks real ones; 1 = real
    token, left or right padding) and positions default to ``cumsum(mask) - 1``, so a left-padded
    row sees the positions of its unpadded sequence. With a cache, the tokens sit at slots
    ``cache_index …`` and ``kv_mask [B, S]`` marks valid slots (prompt padding is invalid)."""
    b, t = tokens.shape
    if cache is None:
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        kv_valid = attention_mask.astype(jnp.bool_)                          # [B, S=T]
        q_slot = jnp.arange(t)
        if positions is None:
            positions = positions_from_mask(attention_mask)
    else:
        if kv_mask is None or positions is None or cache_index is None:
            raise ValueError("a cached call needs kv_mask, positions and cache_index")
        kv_valid = kv_mask.astype(jnp.bool_)
        q_slot = cache_index + jnp.arange(t)
    s_slot = jnp.arange(kv_valid.shape[1])
    mask = kv_valid[:, None, :] & (s_slot[None, None, :] <= q_slot[None, :, None])  # [B, T, S]
    return mask, positions


def write_cache(kv, k, v, cache_index):
    """``(k, v)`` (``[B, H_kv, T, K]``) written into cache pair ``kv`` at slot ``cache_index``;
    returns the full keys and values and the new pair (or the inputs when there is no cache)."""
    if kv is None:
        return k, v, None
    k_cache, v_cache = kv                                                    # [B, H_kv, S, K]
    k = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, cache_index, 0))
    v = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, cache_index, 0))
    if k.dtype != jnp.float32 and jax.default_backend() == "cpu":
        # XLA:CPU runs the batched attention dots in float32: without the barrier it fuses the
        # cache update into that upcast and into the bf16 cache output separately, copying the
        # whole cache first (a decode step took 25% more CPU time than with a float32 cache)
        k, v = lax.optimization_barrier((k, v))
    return k, v, (k, v)


def keep_mask(rate: float, key: jax.Array | None, shape, like: jax.Array | None = None
              ) -> jax.Array | None:
    """Dropout multiplier of ``shape`` (0, or 1/(1 − rate) with probability 1 − rate), or None
    when there is no dropout. Row ``i`` (axis 0, the batch) draws from ``fold_in(key, i)``.

    Inside ``shard_map`` with the batch split over mesh axes that ``like`` (an activation of
    this shard) varies over and ``key`` does not (a replicated step key), ``i`` is the row's
    index in the global batch: shards never share masks (drawn from the whole key, each would
    draw the same ones), and every row gets the mask it gets on one device."""
    if rate == 0.0 or key is None:
        return None
    axes = () if like is None else tuple(sorted(_varying(like) - _varying(key)))
    first = lax.axis_index(axes) * shape[0] if axes else 0
    rows = first + jnp.arange(shape[0])
    bits = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate,
                                                   shape[1:]))(rows)
    return jnp.where(bits, 1.0 / (1.0 - rate), 0.0)


def _varying(x) -> frozenset:
    """The mesh axes ``x`` varies over inside ``shard_map`` (empty outside it)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)   # JAX >= 0.10; before: ``vma``
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    keep = keep_mask(rate, key, x.shape, like=x)
    return x if keep is None else x * keep.astype(x.dtype)


def run_blocks(blocks, x, mask, positions, cache, cache_index, keys, output_positions):
    """``x`` through every block (``block(x, mask, positions, kv, cache_index, key,
    out_positions) -> (x, kv)``); only the last block computes at ``output_positions``.
    Returns ``(x, new cache or None)``."""
    new_cache = []
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        x, kv = block(x, mask, positions, None if cache is None else cache[i], cache_index,
                      keys[i], output_positions if i == last else None)
        new_cache.append(kv)
    return x, None if cache is None else tuple(new_cache)


def layer_keys(dropout_key: jax.Array | None, rate: float, n: int) -> list:
    """``n`` per-layer dropout keys (None when there is no dropout)."""
    if dropout_key is None or rate == 0:
        return [None] * n
    return list(jax.random.split(dropout_key, n))


def output(hidden, out_w, heads, cache, compute_logits: bool, dtype=None) -> ModelOutput:
    """Logits against the output matrix ``out_w [V, D]`` and every scalar head, in float32.

    With ``dtype`` (bf16) the logit matmul takes bf16 inputs and accumulates in float32
    (:func:`~rlhf_jax.models.dense.dense`, so its backward does too); the heads stay float32."""
    logits = None
    if compute_logits and dtype is not None:
        logits = dense(hidden, out_w.T, jnp.zeros(out_w.shape[:1], out_w.dtype), dtype)
    elif compute_logits:
        logits = jnp.einsum("BTD,VD->BTV", hidden, out_w).astype(jnp.float32)
    scalars = {name: head(hidden)[..., 0].astype(jnp.float32) for name, head in heads.items()}
    return ModelOutput(logits, hidden, scalars, cache)
