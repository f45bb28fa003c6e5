"""The custom-VJP attention: same values and gradients as the plain expression and a NumPy derivation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.attention import NEG_INF, attention

B, H, T, S, K = 3, 2, 5, 7, 4
SCALE = 1.0 / np.sqrt(K)


def _plain(q, k, v, mask, keep=None):
    scores = jnp.einsum("BHTK,BHSK->BHTS", q, k) * SCALE
    p = jax.nn.softmax(jnp.where(mask[:, None], scores, NEG_INF), axis=-1)
    return jnp.einsum("BHTS,BHSK->BHTK", p if keep is None else p * keep, v)


def _inputs(seed=0, dropout=False):
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v = (jax.random.normal(ks[i], (B, H, n, K)) for i, n in enumerate((T, S, S)))
    w = jax.random.normal(ks[3], (B, H, T, K))                  # a random cotangent direction
    # causal over the last T of S slots; row 1 left-padded (2 invalid slots); row 2's first query
    # sees only invalid slots (a fully masked row)
    valid = np.ones((B, S), bool)
    valid[1, :2] = False
    valid[2, :3] = False
    causal = np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None]     # [T, S]
    mask = valid[:, None, :] & causal[None]
    mask[2, 0] = False
    keep = None
    if dropout:
        keep = jnp.where(jax.random.bernoulli(ks[4], 0.7, (B, H, T, S)), 1 / 0.7, 0.0)
    return q, k, v, jnp.asarray(mask), keep, w


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_values_and_gradients_match_plain_expression(dropout, jit):
    q, k, v, mask, keep, w = _inputs(dropout=dropout)
    f = lambda q, k, v: attention(q, k, v, mask, keep, scale=SCALE)  # noqa: E731
    np.testing.assert_allclose(f(q, k, v), _plain(q, k, v, mask, keep), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda *a: jnp.sum(jnp.tanh(f(*a)) * w), argnums=(0, 1, 2))
    got = (jax.jit(grad) if jit else grad)(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(jnp.tanh(_plain(*a, mask, keep)) * w), argnums=(0, 1, 2))(
        q, k, v)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_gradients_match_numpy_derivation():
    """dv = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)) on allowed entries, dQ = s·dS·K,
    dK = s·dSᵀ·Q, in float64 NumPy; a fully masked row gets no gradient into q or k."""
    q, k, v, mask, _, w = _inputs(seed=1)
    qn, kn, vn, wn, m = (np.asarray(a, np.float64) for a in (q, k, v, w, mask))
    s = np.where(m[:, None] > 0, np.einsum("bhtk,bhsk->bhts", qn, kn) * SCALE, NEG_INF)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ vn
    do = wn * (1 - np.tanh(out) ** 2)
    dv = np.swapaxes(p, -1, -2) @ do
    dp = do @ np.swapaxes(vn, -1, -2)
    ds = np.where(m[:, None] > 0, p * (dp - (dp * p).sum(-1, keepdims=True)), 0.0) * SCALE
    dq, dk = ds @ kn, np.swapaxes(ds, -1, -2) @ qn
    got = jax.grad(lambda *a: jnp.sum(jnp.tanh(attention(*a, mask, scale=SCALE)) * w),
                   argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(attention(q, k, v, mask, scale=SCALE), out, rtol=1e-5, atol=1e-6)
    for g, r in zip(got, (dq, dk, dv)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(got[0])[2, :, 0] == 0.0)           # the fully masked query row


def _bf16(a):
    """``a`` rounded to bfloat16, as float64."""
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)


def test_bf16_casts_q_k_v_and_the_probabilities_for_p_v():
    """Under bf16, q, k, v are rounded to bf16, the scores and softmax are float32, and the
    probabilities p are rounded to bf16 for the p·V product, which accumulates in float32: the
    output matches a float64 reference doing exactly that, and not the one keeping p unrounded."""
    q, k, v, mask, _, w = _inputs(seed=2)
    qn, kn, vn = _bf16(q), _bf16(k), _bf16(v)
    s = np.where(np.asarray(mask)[:, None], np.einsum("bhtk,bhsk->bhts", qn, kn) * SCALE, NEG_INF)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    got = attention(q, k, v, mask, scale=SCALE, dtype=jnp.bfloat16)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _bf16(p) @ vn, rtol=1e-5, atol=2e-6)
    assert np.max(np.abs(np.asarray(got) - p @ vn)) > 1e-3                # p is not kept f32
    grad = jax.grad(lambda *a: jnp.sum(jnp.tanh(attention(*a, mask, scale=SCALE,
                                                          dtype=jnp.bfloat16)) * w),
                    argnums=(0, 1, 2))
    g16 = jax.jit(grad)(q, k, v)
    g32 = jax.grad(lambda *a: jnp.sum(jnp.tanh(attention(*a, mask, scale=SCALE)) * w),
                   argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g16, g32):
        assert a.dtype == jnp.float32 and np.all(np.isfinite(a))
        np.testing.assert_allclose(a, r, atol=0.03 * np.max(np.abs(r)))
    assert np.all(np.asarray(g16[0])[2, :, 0] == 0.0)           # the fully masked query row


def test_transposed_copies_only_on_the_cpu_backend(monkeypatch):
    """The materialised transposes are a CPU workaround: traced for another backend the backward
    pass has none and the gradients of the plain expression (each backend traced at a batch size
    of its own: JAX caches a custom VJP's trace per shape)."""
    q, k, v, mask, _, w = _inputs(seed=3)

    def grad(f, n):
        return jax.grad(lambda *a: jnp.sum(f(*a) * w[:n]), argnums=(0, 1, 2))

    def barrier(n):
        g = grad(lambda *a: attention(*a, mask[:n], scale=SCALE), n)
        return "optimization_barrier" in str(jax.make_jaxpr(g)(q[:n], k[:n], v[:n]))

    assert barrier(1) == (jax.default_backend() == "cpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not barrier(2)
    got = grad(lambda *a: attention(*a, mask[:2], scale=SCALE), 2)(q[:2], k[:2], v[:2])
    ref = grad(lambda *a: _plain(*a, mask[:2]), 2)(q[:2], k[:2], v[:2])
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
    """The operand element types of every ``dot`` in an optimised HLO module's text."""
    found = []
    for comp in re.split(r"\n(?=\S)", hlo):
        for m in re.finditer(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)", comp):
            types = [re.search(r"%" + re.escape(o) + r" = (\w+)\[", comp) for o in m.groups()]
            found.append(tuple(t.group(1) if t else "?" for t in types))
    return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's layout handling")
def test_bf16_attention_multiplies_in_bf16_after_xla_layouts():
    """q, k, v made by a transpose (the heads split off, as in the models) and the backward's
    transposed copies reach every dot of the compiled bf16 gradient as bf16 — not upcast to
    float32 by XLA:CPU for a permuted layout (:func:`rlhf_jax.models.dense.contiguous`)."""
    b, h, s, k = 2, 2, 64, 32                 # shapes XLA gives its matmul library (tiny ones
    rng = np.random.default_rng(4)            # it multiplies in float32 anyway)
    x = jnp.asarray(rng.normal(size=(b, s, 3, h, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(b, h, s, k)), jnp.float32)
    mask = jnp.tril(jnp.ones((s, s), bool))[None].repeat(b, 0)

    def loss(x):                              # x [b, s, 3, h, k] -> heads [b, h, s, k]
        q, k, v = (jnp.swapaxes(x[:, :, i], 1, 2) for i in range(3))
        return jnp.sum(attention(q, k, v, mask, scale=SCALE, dtype=jnp.bfloat16) * w)

    dots = _dot_operand_dtypes(jax.jit(jax.grad(loss)).lower(x).compile().as_text())
    assert len(dots) == 5                     # q·kᵀ; dp, dv, dq, dk (p·v unused by the gradient)
    assert all(d == ("bf16", "bf16") for d in dots), dots
