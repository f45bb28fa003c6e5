"""The custom-VJP dense layer: same values and gradients as the plain expression, also per shard."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

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


def test_per_shard_gradients_of_replicated_parameters_match_plain_autodiff():
    """Inside shard_map a replicated kernel meets a sharded x: the parameter gradients must come out
    summed over shards (replicated), exactly as JAX's autodiff of the plain expression gives."""
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    x, k, b, w = _inputs((4, 8))
    x, w = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, w))

    def grads(f):
        def per_shard(x, k, b, w):
            return jax.grad(lambda k, b: jnp.sum(jnp.sin(f(x, k, b)) * w), argnums=(0, 1))(k, b)
        return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                                     out_specs=P()))(x, k, b, w)

    for got, ref in zip(grads(dense), grads(_plain)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
