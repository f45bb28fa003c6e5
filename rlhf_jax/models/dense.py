"""A dense layer whose backward pass multiplies by an explicit copy of the transposed kernel, in
float32 or in bf16 mixed precision.

On this CPU backend, XLA lowers ``dy @ kernelᵀ`` (the input gradient of ``x @ kernel``) to a
library matmul that reads the kernel transposed, and it ran 2-2.5x slower than the forward matmul of
the same size in a profile of the SFT step. The custom VJP transposes the (small) kernel into a new
buffer behind ``lax.optimization_barrier`` (so XLA cannot fold the transpose back into the dot) and
then multiplies in the forward layout. Gradients are the same math; ``tests/test_dense.py`` checks
them against ``jax.grad`` of the plain expression. The copy is a CPU workaround: on other backends
(:func:`transposed`) the transpose is left to XLA, which folds it into the dot.

Mixed precision (``dtype=bfloat16``): ``x`` and the kernel enter the matmuls as bf16 and every
product accumulates in float32 (``preferred_element_type``), so the output is float32. The kernel is
cast inside the custom VJP, so its gradient comes straight from the float32 accumulator (never
rounded to bf16); ``x``'s gradient is bf16 (the cast's cotangent), as in PyTorch autocast.

The weight gradient ``xᵀ·dy`` contracts the leading axis of both operands. XLA:CPU does not route
that layout to its matmul library (YNNPACK), so it runs as XLA's own dot at the float32 rate
whatever the input dtype (186 GFLOP/s in bf16 on an AMX Xeon, against 1,211-1,422 for bf16
products in the plain layout). Under bf16 the backward pass therefore multiplies a materialised
row-major ``xᵀ`` (:func:`transposed`) in the plain layout. In float32 the copy costs more than it
saves (reference SFT step 250.9 → 304.2 ms on that Xeon), so float32 keeps the ``xᵀ·dy`` dot.
With attention's operands kept row-major too (``models/attention.py``), every matmul of a bf16
training step runs bf16 × bf16 → f32 in the library: reference SFT step on the AMX Xeon 212.5 →
153.5 ms (in-process A/B, 20 steps each; 219.7 ms before the weight-gradient copy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype=None) -> jax.Array:
    """``x @ kernel + bias`` over the last axis of ``x`` (``kernel [in, out]``, ``bias [out]``);
    with ``dtype`` (bf16) the matmul inputs are cast to it and it accumulates in float32.

    Inside ``shard_map`` a replicated kernel meets a per-shard ``x``: the kernel and bias are cast
    to varying over ``x``'s mesh axes first (as JAX's own autodiff does implicitly), so the cast's
    transpose sums their gradients over shards exactly as for the plain expression.
    """
    kernel, bias = (_vary_like(x, p) for p in (kernel, bias))
    if dtype is not None:
        x = x.astype(dtype)
    return _dense(x, kernel, bias)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` accumulated in float32 (inputs of one dtype; a no-op option for float32)."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def transposed(x: jax.Array) -> jax.Array:
    """``x`` with its last two axes swapped; on the CPU backend materialised behind
    ``lax.optimization_barrier`` (not foldable into the next dot; bf16 stored row-major,
    :func:`contiguous`), elsewhere left to XLA."""
    x_t = jnp.swapaxes(x, -1, -2)
    if jax.default_backend() != "cpu":
        return x_t
    return contiguous(x_t) if x.dtype == jnp.bfloat16 else lax.optimization_barrier(x_t)


def contiguous(x: jax.Array) -> jax.Array:
    """``x`` itself; on the CPU backend, for bf16, stored row-major before the next dot.

    XLA:CPU gives a transpose's result a permuted layout instead of copying it, and a bf16 dot
    whose operand arrives in a permuted layout is upcast: XLA copies the operand into float32
    and multiplies in float32 (rounded to bf16 first, so the values are the same) — outside the
    bf16 matmul units, at the float32 rate. A barrier alone keeps the permuted layout; the
    barrier around a flat reshape forces the row-major copy, in bf16 (one layout for 1-D)."""
    if jax.default_backend() != "cpu" or x.dtype != jnp.bfloat16:
        return x
    return lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


def _varying(a) -> frozenset:
    return jax.typeof(a).manual_axis_type.varying


def _vary_like(x, p):
    axes = tuple(sorted(_varying(x) - _varying(p)))
    return lax.pcast(p, axes, to="varying") if axes else p


@jax.custom_vjp
def _dense(x, kernel, bias):                     # the matmul runs in x's dtype
    return matmul(x, kernel.astype(x.dtype)) + bias


def _fwd(x, kernel, bias):
    return _dense(x, kernel, bias), (x, kernel)


def _bwd(res, dy):
    x, kernel = res                              # x in the compute dtype, kernel the parameter
    kernel_t = transposed(kernel.astype(x.dtype))                        # [out, in]
    dy2 = dy.reshape(-1, dy.shape[-1])                                   # float32
    dyc = dy.astype(x.dtype)
    dx = matmul(dyc, kernel_t).astype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if x.dtype == jnp.bfloat16:                                          # see module doc
        # the barrier after the dot: XLA would fold a later transpose of dk (the tied output
        # matrix's gradient) into a bf16 dot of a layout no CPU kernel runs
        x_t = transposed(x2)
        dk = lax.optimization_barrier(matmul(x_t, dyc.reshape(dy2.shape)))
    else:
        dk = matmul(x2.T, dyc.reshape(dy2.shape))
    db = jnp.sum(dy2, axis=0)
    return dx, dk.astype(kernel.dtype), db.astype(kernel.dtype)


_dense.defvjp(_fwd, _bwd)


class Linear(nnx.Linear):
    """``nnx.Linear`` (same parameters and names) computed with :func:`dense` in its ``dtype``
    (None = float32; bf16 = mixed precision, float32 output); without a bias (``use_bias=False``)
    it adds zeros."""

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        bias = (jnp.zeros(kernel.shape[-1:], kernel.dtype) if self.bias is None
                else self.bias[...])
        return dense(x, kernel, bias, self.dtype)
