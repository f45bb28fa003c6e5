"""A GPT-2-compatible decoder in Flax NNX, with optional scalar heads and an explicit KV cache.

Architecture as in Radford et al. 2019 / HF ``GPT2LMHeadModel``: learned token and position
embeddings, pre-LayerNorm blocks (attention + GELU MLP), a final LayerNorm and an output layer tied
to the token embedding. Parameter names and kernel layouts ([in, out]) follow HF's GPT-2 so a
checkpoint imports by renaming alone.

Einsum letters: B batch, T query positions, S key positions (cache slots), D d_model, H heads,
K head_dim, F MLP width, V vocab.

The KV cache is a tuple with one ``(k, v)`` pair per layer, each ``[B, H, S, K]``, written in place
with ``lax.dynamic_update_slice`` (see ``../shared/bench/CPU-NOTES.md``: per-layer arrays are ~2x
faster than one stacked array on CPU). It is an argument and a return value, never module state, so
jitted code stays a pure function of ``(params, tokens, cache)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from rlhf_jax.models.attention import attention
from rlhf_jax.models.config import GPTConfig
from rlhf_jax.models.dense import Linear
from rlhf_jax.ops import positions_from_mask

KVCache = tuple[tuple[jax.Array, jax.Array], ...]


class ModelOutput(NamedTuple):
    logits: jax.Array | None         # [B, T, V] float32, or None when not requested
    hidden: jax.Array                # [B, T, D] final-LayerNorm output
    scalars: dict[str, jax.Array]    # head name -> [B, T]
    cache: KVCache | None            # updated cache when one was passed in
    # With ``output_positions`` the T axis of logits / hidden / scalars holds only those positions.


Positions = slice | jax.Array | None   # a static slice of T, or per-row indices [B, T']


def take_positions(x: jax.Array, positions: Positions) -> jax.Array:
    """``x [B, T, ...]`` at ``positions``: all (None), a static slice, or indices ``[B, T']``."""
    if positions is None:
        return x
    if isinstance(positions, slice):
        return x[:, positions]
    idx = positions.astype(jnp.int32).reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def init_cache(cfg: GPTConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    """An empty KV cache: per layer a ``(k, v)`` pair of zeros ``[B, H, S, K]``."""
    shape = (batch, cfg.n_heads, length, cfg.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers))


def _keep(rate: float, key: jax.Array | None, shape) -> jax.Array | None:
    """Dropout multiplier of ``shape`` (0, or 1/(1 − rate) with probability 1 − rate), or None
    when there is no dropout."""
    if rate == 0.0 or key is None:
        return None
    return jnp.where(jax.random.bernoulli(key, 1.0 - rate, shape), 1.0 / (1.0 - rate), 0.0)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    keep = _keep(rate, key, x.shape)
    return x if keep is None else x * keep.astype(x.dtype)


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        self.c_attn = Linear(d, 3 * d, kernel_init=_normal(0.02), rngs=rngs)
        self.c_proj = Linear(d, d, kernel_init=_normal(0.02 / math.sqrt(2 * cfg.n_layers)),
                             rngs=rngs)

    def __call__(self, x, mask, kv=None, cache_index=None, dropout_key=None, positions=None):
        """Keys and values at every position; attention (and so outputs) only at ``positions``."""
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = self.c_attn(x).reshape(b, t, 3, cfg.n_heads, cfg.head_dim)   # [B, T, 3, H, K]
        q = jnp.swapaxes(take_positions(qkv[:, :, 0], positions), 1, 2)     # [B, H, T', K]
        k, v = (jnp.swapaxes(qkv[:, :, i], 1, 2) for i in (1, 2))          # [B, H, T, K]
        mask = take_positions(mask, positions)                              # [B, T', S]
        if kv is not None:
            k_cache, v_cache = kv                                            # [B, H, S, K]
            k = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, cache_index, 0))
            v = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, cache_index, 0))
            kv = (k, v)
        keep = _keep(cfg.dropout, dropout_key, (b, cfg.n_heads, q.shape[2], k.shape[2]))
        out = attention(q, k, v, mask, keep, scale=1.0 / math.sqrt(cfg.head_dim))  # [B,H,T',K]
        out = jnp.swapaxes(out, 1, 2).reshape(b, q.shape[2], cfg.d_model)
        return self.c_proj(out), kv


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.c_fc = Linear(cfg.d_model, cfg.ff_dim, kernel_init=_normal(0.02), rngs=rngs)
        self.c_proj = Linear(cfg.ff_dim, cfg.d_model,
                             kernel_init=_normal(0.02 / math.sqrt(2 * cfg.n_layers)), rngs=rngs)

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))  # GPT-2's "gelu_new"


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.ln_1 = nnx.LayerNorm(cfg.d_model, epsilon=cfg.ln_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(cfg.d_model, epsilon=cfg.ln_eps, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, mask, kv=None, cache_index=None, dropout_key=None, positions=None):
        keys = (None,) * 3 if dropout_key is None else tuple(jax.random.split(dropout_key, 3))
        a, kv = self.attn(self.ln_1(x), mask, kv, cache_index, keys[0], positions)
        x = take_positions(x, positions) + _dropout(a, self.cfg.dropout, keys[1])
        x = x + _dropout(self.mlp(self.ln_2(x)), self.cfg.dropout, keys[2])
        return x, kv


class GPT(nnx.Module):
    """GPT-2 trunk + LM head (the token embedding, or ``lm_head`` when ``cfg.tie_embeddings`` is
    False) + optional scalar heads (e.g. ``("reward",)`` or ``("value",)``).

    Call with ``tokens [B, T]`` and ``attention_mask [B, T]`` (1 = real token; left or right
    padding). Position ids default to ``cumsum(mask) - 1`` so a left-padded row sees the same
    positions as the unpadded sequence. With ``cache`` (from :func:`init_cache`), the tokens are
    written at cache slots ``cache_index …`` and attend to every valid slot at or before their own;
    ``kv_mask [B, S]`` marks valid slots (prompt padding is invalid).

    ``output_positions`` (a static slice of T, or per-row indices ``[B, T']``) asks for the
    outputs (logits, hidden, scalars) at those positions only. Nothing upstream of the last block
    depends on which outputs are read, so the last block runs its (fused) QKV projection everywhere
    but attention, output projection, MLP, final LayerNorm and heads only there: the same numbers
    as slicing the full output, for less work (e.g. response positions in PPO, the last token in a
    reward model).
    With dropout, the last block's dropout masks differ from the full call's.
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, heads: tuple[str, ...] = ()):
        self.cfg = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_normal(0.02), rngs=rngs)
        self.wpe = nnx.Embed(cfg.max_len, cfg.d_model, embedding_init=_normal(0.01), rngs=rngs)
        self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=cfg.ln_eps, rngs=rngs)
        if not cfg.tie_embeddings:                                           # [V, D] like wte
            self.lm_head = nnx.Param(_normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.d_model)))
        self.heads = nnx.Dict({
            name: nnx.Linear(cfg.d_model, 1, kernel_init=_normal(1.0 / math.sqrt(cfg.d_model)),
                             rngs=rngs)
            for name in heads})

    def __call__(
        self,
        tokens: jax.Array,                     # [B, T] int
        *,
        attention_mask: jax.Array | None = None,   # [B, T]; required without a cache
        positions: jax.Array | None = None,        # [B, T]
        cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
        kv_mask: jax.Array | None = None,          # [B, S] with a cache
        compute_logits: bool = True,
        output_positions: Positions = None,
        dropout_key: jax.Array | None = None,
    ) -> ModelOutput:
        b, t = tokens.shape
        if cache is None:
            if attention_mask is None:
                attention_mask = jnp.ones((b, t), jnp.bool_)
            kv_valid = attention_mask.astype(jnp.bool_)                      # [B, S=T]
            q_slot = jnp.arange(t)
            if positions is None:
                positions = positions_from_mask(attention_mask)
        else:
            if kv_mask is None or positions is None or cache_index is None:
                raise ValueError("a cached call needs kv_mask, positions and cache_index")
            kv_valid = kv_mask.astype(jnp.bool_)
            q_slot = cache_index + jnp.arange(t)
        s_slot = jnp.arange(kv_valid.shape[1])
        mask = kv_valid[:, None, :] & (s_slot[None, None, :] <= q_slot[None, :, None])  # [B,T,S]

        x = self.wte(tokens) + self.wpe(positions)                          # [B, T, D]
        keys = [None] * (len(self.h) + 1)
        if dropout_key is not None and self.cfg.dropout > 0:
            keys = list(jax.random.split(dropout_key, len(self.h) + 1))
        x = _dropout(x, self.cfg.dropout, keys[-1])
        new_cache = []
        last = len(self.h) - 1
        for i, block in enumerate(self.h):
            x, kv = block(x, mask, None if cache is None else cache[i], cache_index, keys[i],
                          output_positions if i == last else None)
            new_cache.append(kv)
        hidden = self.ln_f(x)                                               # [B, T', D]
        logits = None
        if compute_logits:
            out_w = self.wte.embedding if self.cfg.tie_embeddings else self.lm_head
            logits = jnp.einsum("BTD,VD->BTV", hidden, out_w[...]).astype(jnp.float32)
        scalars = {name: head(hidden)[..., 0].astype(jnp.float32) for name, head in self.heads.items()}
        return ModelOutput(logits, hidden, scalars, None if cache is None else tuple(new_cache))
