"""The custom-VJP dense layer: same values and gradients as the plain expression, also per shard."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from conftest import xla_env
from rlhf_jax.models.dense import dense


def _plain(x, k, b):
    return x @ k + b


def _inputs(shape=(3, 5, 8), out=6, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k1, shape)
    k = jax.random.normal(k2, (shape[-1], out))
    b = jax.random.normal(k3, (out,))
    w = jax.random.normal(k4, shape[:-1] + (out,))      # a random cotangent direction
    return x, k, b, w


def test_values_and_gradients_match_plain_expression():
    for shape in [(4, 8), (3, 5, 8)]:
        x, k, b, w = _inputs(shape)
        np.testing.assert_allclose(dense(x, k, b), _plain(x, k, b), rtol=1e-6, atol=1e-6)
        g = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.tanh(dense(*a)) * w), argnums=(0, 1, 2)))(x, k, b)
        r = jax.grad(lambda *a: jnp.sum(jnp.tanh(_plain(*a)) * w), argnums=(0, 1, 2))(x, k, b)
        for got, ref in zip(g, r):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        # against a NumPy hand derivation of the three gradients
        dy = np.asarray(w * (1 - np.tanh(_plain(x, k, b)) ** 2)).reshape(-1, k.shape[1])
        x2 = np.asarray(x).reshape(-1, k.shape[0])
        np.testing.assert_allclose(g[0], (dy @ np.asarray(k).T).reshape(x.shape), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(g[1], x2.T @ dy, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g[2], dy.sum(0), rtol=1e-5, atol=1e-5)


_SHARDED_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from rlhf_jax.models.dense import dense
assert len(jax.devices()) == 2
mesh = jax.make_mesh((2,), ("data",))
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
x, k, b = jax.random.normal(k1, (6, 8)), jax.random.normal(k2, (8, 5)), jax.random.normal(k3, (5,))
loss = lambda x, k, b, f: jnp.sum(jnp.sin(f(x, k, b)))
grad = lambda x, k, b, f: jax.grad(loss, argnums=(1, 2))(x, k, b, f)
full = grad(x, k, b, lambda x, k, b: x @ k + b)          # whole batch, one device
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
bf16 = lambda x, k, b: dense(x, k, b, jnp.bfloat16)
full16 = grad(x, k, b, bf16)                              # bf16 products, whole batch
for f, ref in ((dense, full), (lambda x, k, b: x @ k + b, full), (bf16, full16)):
    got = jax.jit(jax.shard_map(lambda x, k, b: grad(x, k, b, f), mesh=mesh,
                                in_specs=(P("data"), P(), P()), out_specs=P()))(xs, k, b)
    for g, r in zip(got, ref):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_per_shard_gradients_of_replicated_parameters_are_summed_over_shards():
    """On 2 simulated devices a replicated kernel meets a sharded x inside shard_map: the parameter
    gradients must equal the whole-batch gradient (summed over shards), as plain autodiff gives;
    under bf16 too (float32 gradients, summed in float32)."""
    env = xla_env(2, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def _bf16(a):
    """``a`` rounded to bfloat16, as float64."""
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)


def test_bf16_values_and_gradients_match_rounded_inputs_in_float64():
    """Under bf16 the products take bf16-rounded inputs and accumulate in float32: the output and
    the kernel gradient equal float64 products of the rounded inputs (to float32 accuracy), and
    the input gradient is that product rounded to bf16; all gradients of float32 inputs are
    float32, the bias gradient the plain sum of the cotangent."""
    x, k, b, w = _inputs((3, 5, 64), out=16)
    y = dense(x, k, b, jnp.bfloat16)
    assert y.dtype == jnp.float32
    ref = _bf16(x) @ _bf16(k) + np.asarray(b, np.float64)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(y) - np.asarray(_plain(x, k, b)))) > 1e-3   # really bf16
    g = jax.jit(jax.grad(lambda *a: jnp.sum(dense(*a, jnp.bfloat16) * w), argnums=(0, 1, 2)))(
        x, k, b)
    assert all(a.dtype == jnp.float32 for a in g)
    w2 = _bf16(w).reshape(-1, 16)
    np.testing.assert_allclose(g[1], _bf16(x).reshape(-1, 64).T @ w2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g[2], np.asarray(w).reshape(-1, 16).sum(0), rtol=1e-5, atol=1e-5)
    dx = (w2 @ _bf16(k).T).reshape(x.shape)
    np.testing.assert_allclose(g[0], _bf16(dx), rtol=2 ** -7)            # one bf16 ulp


def test_transposed_kernel_copy_only_on_the_cpu_backend(monkeypatch):
    """The materialised transpose (``optimization_barrier``) is a CPU workaround; traced for
    another backend the backward pass has none and the gradients of the plain expression. (JAX
    caches a custom VJP's trace per shape: each backend gets a shape of its own.)"""
    def grads(f, shape):
        x, k, b, w = _inputs(shape)
        return jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)), (x, k, b)

    def barrier(shape):
        grad, args = grads(dense, shape)
        return "optimization_barrier" in str(jax.make_jaxpr(grad)(*args))

    assert barrier((2, 3, 8)) == (jax.default_backend() == "cpu")
    if jax.default_backend() == "cpu":
        # bf16 also copies xᵀ for the weight gradient (a plain-layout dot)
        x, k, b, w = _inputs((2, 5, 8))
        jaxpr = str(jax.make_jaxpr(jax.grad(
            lambda *a: jnp.sum(dense(*a, jnp.bfloat16) * w), argnums=(0, 1, 2)))(x, k, b))
        assert jaxpr.count("optimization_barrier") == 3   # kernelᵀ, xᵀ, and after xᵀ·dy
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not barrier((2, 4, 8))
    (grad, args), (ref, _) = grads(dense, (2, 4, 8)), grads(_plain, (2, 4, 8))
    for got, r in zip(grad(*args), ref(*args)):
        np.testing.assert_allclose(got, r, rtol=1e-5, atol=1e-5)
