"""Slow, independent NumPy reference implementations (float64) that the tests compare against.

Nothing here imports library code except to read a parameter pytree; every formula is written out
from its textbook definition so an error in the library cannot be mirrored here.
"""

from __future__ import annotations

import math

import numpy as np


# --------------------------------------------------------------------------- elementary math
def log_softmax(x, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def softmax(x, axis: int = -1) -> np.ndarray:
    return np.exp(log_softmax(x, axis))


def token_logprobs(logits, targets) -> np.ndarray:
    """``log softmax(logits)[..., targets]`` by explicit loops over the leading positions."""
    logits = np.asarray(logits, np.float64)
    targets = np.asarray(targets)
    lp = log_softmax(logits)
    flat_lp = lp.reshape(-1, lp.shape[-1])
    flat_t = targets.reshape(-1)
    out = np.array([flat_lp[i, int(flat_t[i])] for i in range(flat_t.size)])
    return out.reshape(targets.shape)


def entropy(logits) -> np.ndarray:
    lp = log_softmax(logits)
    return -np.sum(np.exp(lp) * lp, axis=-1)


def masked_mean(x, mask) -> float:
    """Mean of the selected entries (0.0 when nothing is selected), by explicit selection."""
    x = np.broadcast_to(np.asarray(x, np.float64), np.broadcast_shapes(np.shape(x), np.shape(mask)))
    sel = x[np.broadcast_to(np.asarray(mask).astype(bool), x.shape)]
    return float(sel.mean()) if sel.size else 0.0


def positions(mask) -> np.ndarray:
    """Position ids by a per-row loop: 0 for padding before the first real token, then 0, 1, ..."""
    mask = np.asarray(mask)
    out = np.zeros(mask.shape, np.int64)
    for b in range(mask.shape[0]):
        seen = 0
        for t in range(mask.shape[1]):
            if mask[b, t]:
                out[b, t] = seen
                seen += 1
            else:
                out[b, t] = max(seen - 1, 0)
    return out


def next_token_nll(logits, targets, mask) -> float:
    """Mean of ``-log p(target)`` over counted tokens."""
    lp = token_logprobs(logits, targets)
    return -masked_mean(lp, mask)


# --------------------------------------------------------------------------- GPT-2 forward
def _np_tree(params):
    from flax import nnx
    import jax

    pure = nnx.to_pure_dict(params)
    return jax.tree.map(lambda a: np.asarray(a, np.float64), pure)


def _layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _linear(x, p):
    return x @ p["kernel"] + p["bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gpt_forward(params, cfg, tokens, attention_mask=None):
    """NumPy GPT-2 forward: returns ``(logits [B,T,V], hidden [B,T,D], scalars {name: [B,T]})``.

    Causal attention over keys that are real tokens (``attention_mask``); positions are
    ``max(cumsum(mask) - 1, 0)``. Rows whose every key is masked (leading left padding) get a
    uniform distribution over all keys; callers only compare real positions.
    """
    p = _np_tree(params)
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask, bool)
    pos = positions(mask)
    d, h = cfg.d_model, cfg.n_heads
    k_dim = d // h
    x = p["wte"]["embedding"][tokens] + p["wpe"]["embedding"][pos]
    allowed = mask[:, None, :] & np.tril(np.ones((t, t), bool))[None]        # [B, T, S]
    for i in range(cfg.n_layers):
        blk = p["h"][i]
        a_in = _layer_norm(x, blk["ln_1"], cfg.ln_eps)
        qkv = _linear(a_in, blk["attn"]["c_attn"])                           # [B, T, 3D]
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        heads = []
        for hh in range(h):
            sl = slice(hh * k_dim, (hh + 1) * k_dim)
            s = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / math.sqrt(k_dim)  # [B, T, S]
            s = np.where(allowed, s, -1e30)
            heads.append(softmax(s) @ v[..., sl])                            # [B, T, K]
        attn = np.concatenate(heads, -1)
        x = x + _linear(attn, blk["attn"]["c_proj"])
        m_in = _layer_norm(x, blk["ln_2"], cfg.ln_eps)
        x = x + _linear(_gelu_tanh(_linear(m_in, blk["mlp"]["c_fc"])), blk["mlp"]["c_proj"])
    hidden = _layer_norm(x, p["ln_f"], cfg.ln_eps)
    logits = hidden @ p["wte"]["embedding"].T
    scalars = {name: _linear(hidden, hp)[..., 0] for name, hp in p.get("heads", {}).items()}
    return logits, hidden, scalars


def param_count_formula(cfg, n_heads_scalar: int = 0) -> int:
    """GPT-2 parameter count: embeddings, L blocks of 12d²+13d, final LayerNorm, scalar heads."""
    v, pl, d, nl, f = cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.n_layers, cfg.ff_dim
    block = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    return v * d + pl * d + nl * block + 2 * d + n_heads_scalar * (d + 1)
