"""A dense layer whose backward pass multiplies by an explicit copy of the transposed kernel.

On this CPU backend, XLA lowers ``dy @ kernelᵀ`` (the input gradient of ``x @ kernel``) to a
library matmul that reads the kernel transposed, and it ran 2-2.5x slower than the forward matmul of
the same size in a profile of the SFT step. The custom VJP transposes the (small) kernel into a new
buffer behind ``lax.optimization_barrier`` (so XLA cannot fold the transpose back into the dot) and
then multiplies in the forward layout. Gradients are the same math; ``tests/test_dense.py`` checks
them against ``jax.grad`` of the plain expression.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``x @ kernel + bias`` over the last axis of ``x`` (``kernel [in, out]``, ``bias [out]``).

    Inside ``shard_map`` a replicated kernel meets a per-shard ``x``: the kernel and bias are cast
    to varying over ``x``'s mesh axes first (as JAX's own autodiff does implicitly), so the cast's
    transpose sums their gradients over shards exactly as for the plain expression.
    """
    kernel, bias = (_vary_like(x, p) for p in (kernel, bias))
    return _dense(x, kernel, bias)


def _varying(a) -> frozenset:
    return jax.typeof(a).manual_axis_type.varying


def _vary_like(x, p):
    axes = tuple(sorted(_varying(x) - _varying(p)))
    return lax.pcast(p, axes, to="varying") if axes else p


@jax.custom_vjp
def _dense(x, kernel, bias):
    return jnp.matmul(x, kernel) + bias


def _fwd(x, kernel, bias):
    return _dense(x, kernel, bias), (x, kernel)


def _bwd(res, dy):
    x, kernel = res
    kernel_t = lax.optimization_barrier(jnp.transpose(kernel))          # [out, in], materialised
    dx = jnp.matmul(dy, kernel_t)
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dk = jnp.matmul(x2.T, dy2)
    return dx, dk.astype(kernel.dtype), jnp.sum(dy2, axis=0).astype(kernel.dtype)


_dense.defvjp(_fwd, _bwd)


class Linear(nnx.Linear):
    """``nnx.Linear`` (same parameters and names) computed with :func:`dense`; without a bias
    (``use_bias=False``) it adds zeros."""

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        bias = (jnp.zeros(kernel.shape[-1:], kernel.dtype) if self.bias is None
                else self.bias[...])
        return dense(x, kernel, bias)
