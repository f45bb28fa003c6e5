"""The Llama family (Llama 3, Qwen2/2.5, Qwen3, SmolLM2) in Flax NNX, beside GPT-2.

Architecture as HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``: token
embedding, pre-RMSNorm blocks (grouped-query attention with rotary positions + SwiGLU MLP), a final
RMSNorm and an output layer (tied to the embedding or not). Parameter names follow HF's
(``embed_tokens``, ``layers.N.self_attn.q_proj``, ``mlp.gate_proj``, ``norm``); kernels are
``[in, out]`` (HF's ``nn.Linear`` stores the transpose).

The details that are easy to get wrong, as HF computes them:

* Rotary positions pair dimension i with i + K/2 (``rotate_half``), not interleaved pairs; inverse
  frequencies ``theta^(-2i/K)`` in float32, optionally Llama-3 scaled; positions are
  ``cumsum(mask) - 1`` for left-padded rows, as for GPT-2.
* Grouped-query attention: query head h reads KV head ``h // (H / H_kv)`` (``repeat``, not tile);
  the KV cache holds only the ``H_kv`` KV heads.
* ``head_dim`` may differ from ``d_model / n_heads`` (Qwen3); scores scale by ``1/√head_dim``.
* Qwen3 normalises each query and key head (RMSNorm over K) after the projection, before rotating.

Einsum letters as in ``gpt2.py``; ``H_kv`` key/value heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models.attention import attention
from rlhf_jax.models.config import LlamaConfig
from rlhf_jax.models.decoder import (keep_mask, layer_keys, mask_and_positions, output,
                                     run_blocks, take_positions, write_cache)
from rlhf_jax.models.dense import Linear


def inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """``[K/2]`` float32 rotary inverse frequencies ``theta^(-2i/K)``, Llama-3 scaled when
    ``cfg.rope_llama3`` is set (long wavelengths divided by ``factor``, short ones kept, a smooth
    blend in between; Meta's Llama 3.1 recipe as transformers computes it)."""
    k = cfg.head_dim
    exps = np.arange(0, k, 2).astype(np.float32) / np.float32(k)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exps)).astype(np.float32)
    if not cfg.rope_llama3:
        return inv
    factor, low, high, orig = cfg.rope_llama3
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = orig / low, orig / high
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [B, T, K]`` of positions ``[B, T]`` (each frequency used for i and i + K/2)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)   # [B, T, K/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)                              # [B, T, K]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, K]``: ``x·cos + rotate_half(x)·sin``, rotate_half(a, b) = (−b, a)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


def _linear(n_in: int, n_out: int, bias: bool, cfg: LlamaConfig, rngs: nnx.Rngs) -> Linear:
    return Linear(n_in, n_out, use_bias=bias, kernel_init=_normal(0.02), dtype=cfg.matmul_dtype,
                  rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, hkv, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = _linear(d, h * k, cfg.qkv_bias, cfg, rngs)
        self.k_proj = _linear(d, hkv * k, cfg.qkv_bias, cfg, rngs)
        self.v_proj = _linear(d, hkv * k, cfg.qkv_bias, cfg, rngs)
        self.o_proj = _linear(h * k, d, cfg.o_bias, cfg, rngs)
        if cfg.qk_norm:
            self.q_norm = nnx.RMSNorm(k, epsilon=cfg.norm_eps, rngs=rngs)
            self.k_norm = nnx.RMSNorm(k, epsilon=cfg.norm_eps, rngs=rngs)

    def __call__(self, x, mask, rope, kv, cache_index, dropout_key, positions):
        """Keys and values at every position; queries (and so outputs) only at ``positions``."""
        cfg = self.cfg
        b, t, _ = x.shape
        cos, sin = rope                                                     # [B, T, K]
        xq = take_positions(x, positions)                                   # [B, T', D]
        q = self.q_proj(xq).reshape(b, xq.shape[1], cfg.n_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, take_positions(cos, positions), take_positions(sin, positions))
        k = apply_rope(k, cos, sin)
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))                # [B, H(_kv), T, K]
        k, v, kv = write_cache(kv, k, v, cache_index)                       # [B, H_kv, S, K]
        groups = cfg.n_heads // cfg.n_kv_heads
        k, v = (jnp.repeat(a, groups, axis=1) for a in (k, v))              # [B, H, S, K]
        mask = take_positions(mask, positions)                              # [B, T', S]
        keep = keep_mask(cfg.dropout, dropout_key, (b, cfg.n_heads, q.shape[2], k.shape[2]),
                         like=x)
        out = attention(q, k, v, mask, keep, scale=1.0 / math.sqrt(cfg.head_dim),
                        dtype=cfg.matmul_dtype)                             # [B, H, T', K]
        out = jnp.swapaxes(out, 1, 2).reshape(b, q.shape[2], cfg.n_heads * cfg.head_dim)
        return self.o_proj(out), kv


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.d_model, cfg.d_ff, cfg.mlp_bias, cfg, rngs)
        self.up_proj = _linear(cfg.d_model, cfg.d_ff, cfg.mlp_bias, cfg, rngs)
        self.down_proj = _linear(cfg.d_ff, cfg.d_model, cfg.mlp_bias, cfg, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))   # SwiGLU


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, mask, rope, kv=None, cache_index=None, dropout_key=None,
                 positions=None):
        a, kv = self.self_attn(self.input_layernorm(x), mask, rope, kv, cache_index,
                               dropout_key, positions)
        x = take_positions(x, positions) + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Llama(nnx.Module):
    """Llama-family decoder + LM head + optional scalar heads; called exactly like
    :class:`rlhf_jax.models.gpt2.GPT` (same arguments, padding rules, cache and
    ``output_positions``; see its docstring)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, heads: tuple[str, ...] = ()):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_normal(0.02),
                                      rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
        if not cfg.tie_embeddings:                                           # [V, D]
            self.lm_head = nnx.Param(_normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.d_model)))
        self.heads = nnx.Dict({
            name: nnx.Linear(cfg.d_model, 1, kernel_init=_normal(1.0 / math.sqrt(cfg.d_model)),
                             rngs=rngs)
            for name in heads})

    def __call__(self, tokens, *, attention_mask=None, positions=None, cache=None,
                 cache_index=None, kv_mask=None, compute_logits: bool = True,
                 output_positions=None, dropout_key=None):
        mask, positions = mask_and_positions(tokens, attention_mask, positions, cache,
                                             cache_index, kv_mask)               # [B, T, S]
        rope = rope_tables(positions, inverse_frequencies(self.cfg))        # [B, T, K] each
        x = self.embed_tokens(tokens)                                       # [B, T, D]
        keys = layer_keys(dropout_key, self.cfg.dropout, len(self.layers))
        x, new_cache = run_blocks(self.layers, x, mask, rope, cache, cache_index, keys,
                                  output_positions)
        hidden = self.norm(x)                                               # [B, T', D]
        out_w = self.embed_tokens.embedding if self.cfg.tie_embeddings else self.lm_head
        return output(hidden, out_w[...], self.heads, new_cache, compute_logits,
                      self.cfg.matmul_dtype)
