"""The custom-VJP dense layer: same values and gradients as the plain expression, also per shard."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

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
for f in (dense, lambda x, k, b: x @ k + b):
    got = jax.jit(jax.shard_map(lambda x, k, b: grad(x, k, b, f), mesh=mesh,
                                in_specs=(P("data"), P(), P()), out_specs=P()))(xs, k, b)
    for g, r in zip(got, full):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_per_shard_gradients_of_replicated_parameters_are_summed_over_shards():
    """On 2 simulated devices a replicated kernel meets a sharded x inside shard_map: the parameter
    gradients must equal the whole-batch gradient (summed over shards), as plain autodiff gives."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
