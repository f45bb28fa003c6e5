"""Masked softmax attention whose backward pass runs every matmul in the plain ``[.., M, K] @ [.., K, N]`` layout.

Autodiff of ``softmax(q kᵀ) v`` asks for two products with a transposed left operand
(``dv = pᵀ·do`` and ``dk = dsᵀ·q``). On XLA:CPU those batched dots do not go to the YNNPACK matmul
library: they run as single-threaded Eigen loops, at 35-42 GFLOP/s against 50-80 GFLOP/s for the
same shapes in the plain layout on this 2-core machine (profile of the SFT step, 16 × 4 heads of
128 × 128 × 64). The custom VJP below copies ``pᵀ`` and ``dsᵀ`` into their own buffers behind
``lax.optimization_barrier`` (so XLA cannot fold the transpose back into the dot) and multiplies in
the plain layout. Values and gradients are the same math; ``tests/test_attention.py`` checks them
against ``jax.grad`` of the plain expression and a NumPy derivation. The copies are a CPU workaround
(:func:`rlhf_jax.models.dense.transposed`); on other backends XLA folds the transposes into the dots.

Mixed precision (``dtype=bfloat16``): q, k and v enter as bf16 and every product accumulates in
float32. The scores, the mask, the softmax and its backward stay float32; the probabilities p are
cast to bf16 for the p·V product (as FlashAttention does; p is in [0, 1], where bf16 keeps 8
significant bits) and for ``dv = pᵀ·dO``, while the float32 p is kept for the softmax backward.
On the CPU backend the bf16 operands of every product are stored row-major first
(:func:`rlhf_jax.models.dense.contiguous`): q, k and v arrive as transposes (the heads split off),
and XLA:CPU multiplies a bf16 operand in a permuted layout in float32, off the bf16 matmul units.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.dense import contiguous, matmul, transposed

NEG_INF = -1e30  # finite, so a fully masked row (left padding) gives a uniform softmax, not NaN


def attention(
    q: jax.Array,          # [B, H, T, K]
    k: jax.Array,          # [B, H, S, K]
    v: jax.Array,          # [B, H, S, K]
    mask: jax.Array,       # [B, T, S] bool, True where query t may attend to slot s
    keep: jax.Array | None = None,   # [B, H, T, S] dropout multiplier (0 or 1/(1-rate)), or None
    *,
    scale: float,
    dtype=None,            # matmul input dtype (bf16); None = q's dtype
) -> jax.Array:             # [B, H, T, K] float32
    """``softmax(where(mask, scale·q kᵀ, −1e30)) · v`` per batch row and head (Vaswani et al. 2017).

    ``keep`` multiplies the attention probabilities (dropout) before they weight ``v``. A fully
    masked row attends uniformly (its gradient with respect to ``q`` and ``k`` is zero, as for the
    plain expression, whose ``where`` passes no gradient to masked scores).
    """
    dtype = q.dtype if dtype is None else dtype
    q, k, v = (a.astype(dtype) for a in (q, k, v))    # a no-op in float32
    if q.shape[-2] > 1:           # not for one decoding step: it would copy the whole KV cache
        q, k, v = (contiguous(a) for a in (q, k, v))  # (a no-op in float32)
    if keep is None:
        return _attention(q, k, v, mask, scale)
    return _attention_dropout(q, k, v, mask, keep, scale)


def _probs(q, k, mask, scale):
    """Float32 softmax probabilities ``[B, H, T, S]`` of the masked, scaled scores."""
    scores = jnp.einsum("BHTK,BHSK->BHTS", q, k,
                        preferred_element_type=jnp.float32) * scale        # [B, H, T, S]
    scores = jnp.where(mask[:, None], scores, NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


def _pv(p, v):
    """``p·v`` with p cast to v's (compute) dtype, accumulated in float32."""
    return matmul(p.astype(v.dtype), v)                                     # [B, H, T, K]


def _grads(q, k, v, mask, p, pk, keep, do, scale):
    """``(dq, dk, dv)`` of ``out = pk·v`` with ``pk = p·keep`` and ``p`` the masked softmax;
    matmul inputs in the compute dtype (q's), softmax backward in float32."""
    c = q.dtype
    doc = contiguous(do.astype(c))
    dp = jnp.einsum("BHTK,BHSK->BHTS", doc, v, preferred_element_type=jnp.float32)
    dv = matmul(transposed(pk.astype(c)), doc)              # [B, H, S, K]
    if keep is not None:
        dp = dp * keep
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))                 # softmax backward
    ds = contiguous((jnp.where(mask[:, None], ds, 0.0) * scale).astype(c))  # [B, H, T, S]
    dq = matmul(ds, k)                                                      # [B, H, T, K]
    dk = matmul(transposed(ds), q)                          # [B, H, S, K]
    return dq.astype(c), dk.astype(c), dv.astype(c)


def _plain(q, k, v, mask, scale):
    return _pv(_probs(q, k, mask, scale), v)


def _plain_fwd(q, k, v, mask, scale):
    p = _probs(q, k, mask, scale)
    return _pv(p, v), (q, k, v, mask, p)


def _plain_bwd(scale, res, do):
    q, k, v, mask, p = res
    return (*_grads(q, k, v, mask, p, p, None, do, scale), None)


def _dropout(q, k, v, mask, keep, scale):
    return _pv(_probs(q, k, mask, scale) * keep, v)


def _dropout_fwd(q, k, v, mask, keep, scale):
    p = _probs(q, k, mask, scale)
    pk = p * keep
    return _pv(pk, v), (q, k, v, mask, keep, p, pk)


def _dropout_bwd(scale, res, do):
    q, k, v, mask, keep, p, pk = res
    return (*_grads(q, k, v, mask, p, pk, keep, do, scale), None, None)


_attention = jax.custom_vjp(_plain, nondiff_argnums=(4,))
_attention.defvjp(_plain_fwd, _plain_bwd)
_attention_dropout = jax.custom_vjp(_dropout, nondiff_argnums=(5,))
_attention_dropout.defvjp(_dropout_fwd, _dropout_bwd)
