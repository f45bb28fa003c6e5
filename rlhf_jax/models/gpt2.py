"""A GPT-2-compatible decoder in Flax NNX, with optional scalar heads and an explicit KV cache.

Architecture as in Radford et al. 2019 / HF ``GPT2LMHeadModel``: learned token and position
embeddings, pre-LayerNorm blocks (attention + GELU MLP), a final LayerNorm and an output layer tied
to the token embedding. Parameter names and kernel layouts ([in, out]) follow HF's GPT-2 so a
checkpoint imports by renaming alone.

Einsum letters: B batch, T query positions, S key positions (cache slots), D d_model, H heads,
K head_dim, F MLP width, V vocab. The call convention, masks, positions and the explicit per-layer
KV cache are shared with the other decoders (:mod:`rlhf_jax.models.decoder`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.attention import attention
from rlhf_jax.models.config import GPTConfig
from rlhf_jax.models.decoder import (KVCache, ModelOutput, Positions, dropout, init_cache,
                                     keep_mask, layer_keys, mask_and_positions, output,
                                     run_blocks, take_positions, write_cache)
from rlhf_jax.models.dense import Linear

__all__ = ["GPT", "KVCache", "ModelOutput", "Positions", "init_cache", "take_positions"]


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with the variance of the centred input, as torch computes it; Flax's default
    ``E[x²] − E[x]²`` cancels in float32 when the mean is large against the spread (10 against 1:
    errors of 6e-5, 100 against 0.5: 1e-2)."""
    return nnx.LayerNorm(cfg.d_model, epsilon=cfg.ln_eps, use_fast_variance=False, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        self.c_attn = Linear(d, 3 * d, kernel_init=_normal(0.02), dtype=cfg.matmul_dtype,
                             rngs=rngs)
        self.c_proj = Linear(d, d, kernel_init=_normal(0.02 / math.sqrt(2 * cfg.n_layers)),
                             dtype=cfg.matmul_dtype, rngs=rngs)

    def __call__(self, x, mask, kv=None, cache_index=None, dropout_key=None, positions=None):
        """Keys and values at every position; attention (and so outputs) only at ``positions``
        (output positions)."""
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = self.c_attn(x).reshape(b, t, 3, cfg.n_heads, cfg.head_dim)   # [B, T, 3, H, K]
        q = jnp.swapaxes(take_positions(qkv[:, :, 0], positions), 1, 2)     # [B, H, T', K]
        k, v = (jnp.swapaxes(qkv[:, :, i], 1, 2) for i in (1, 2))          # [B, H, T, K]
        mask = take_positions(mask, positions)                              # [B, T', S]
        k, v, kv = write_cache(kv, k, v, cache_index)                      # [B, H, S, K]
        keep = keep_mask(cfg.dropout, dropout_key, (b, cfg.n_heads, q.shape[2], k.shape[2]),
                         like=x)
        out = attention(q, k, v, mask, keep, scale=1.0 / math.sqrt(cfg.head_dim),
                        dtype=cfg.matmul_dtype)                             # [B, H, T', K]
        out = jnp.swapaxes(out, 1, 2).reshape(b, q.shape[2], cfg.d_model)
        return self.c_proj(out), kv


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.c_fc = Linear(cfg.d_model, cfg.ff_dim, kernel_init=_normal(0.02),
                           dtype=cfg.matmul_dtype, rngs=rngs)
        self.c_proj = Linear(cfg.ff_dim, cfg.d_model,
                             kernel_init=_normal(0.02 / math.sqrt(2 * cfg.n_layers)),
                             dtype=cfg.matmul_dtype, rngs=rngs)

    def __call__(self, x):
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))  # GPT-2's "gelu_new"


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, mask, token_positions, kv=None, cache_index=None, dropout_key=None,
                 positions=None):
        del token_positions   # learned absolute positions enter at the embedding
        keys = (None,) * 3 if dropout_key is None else tuple(jax.random.split(dropout_key, 3))
        a, kv = self.attn(self.ln_1(x), mask, kv, cache_index, keys[0], positions)
        x = take_positions(x, positions) + dropout(a, self.cfg.dropout, keys[1])
        x = x + dropout(self.mlp(self.ln_2(x)), self.cfg.dropout, keys[2])
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
        self.ln_f = _layer_norm(cfg, rngs)
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
        mask, positions = mask_and_positions(tokens, attention_mask, positions, cache,
                                             cache_index, kv_mask)               # [B, T, S]
        x = self.wte(tokens) + self.wpe(positions)                          # [B, T, D]
        keys = layer_keys(dropout_key, self.cfg.dropout, len(self.h) + 1)
        x = dropout(x, self.cfg.dropout, keys[-1])
        x, new_cache = run_blocks(self.h, x, mask, positions, cache, cache_index, keys,
                                  output_positions)
        hidden = self.ln_f(x)                                               # [B, T', D]
        out_w = self.wte.embedding if self.cfg.tie_embeddings else self.lm_head
        return output(hidden, out_w[...], self.heads, new_cache, compute_logits,
                      self.cfg.matmul_dtype)
