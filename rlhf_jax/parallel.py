"""Data parallelism: the pmap programming model expressed with ``jax.shard_map`` over a mesh.

Step functions are written per shard: they see their slice of the batch and reduce every batch
statistic over the mesh axis ``"data"`` (``ops.masked_mean(..., axis_name="data")`` psums sums and
counts). Parameters and optimizer state are replicated; because they are unvarying over the mesh
axis, ``jax.grad`` of a loss built from psum-ed statistics already returns the psum of the shards'
contributions — the full-batch gradient — on every device, so updates stay identical everywhere.

``data_parallel(step, mesh, ...)`` wraps a ``(state, batch, key) -> (state, metrics)`` step into a
jitted, state-donating function over ``mesh``; the same code runs on 1 or N devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.configs import check

AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every visible device, all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def check_divisible(n: int, mesh: Mesh, field: str, what: str = "global batch") -> None:
    """Config-time error naming ``field`` when ``n`` rows do not split evenly over the mesh."""
    size = mesh.shape[AXIS]
    check(n % size == 0, field, f"the {what} of {n} does not divide over {size} devices "
          f"(mesh axis '{AXIS}'); choose a multiple of {size}")


def data_parallel(step: Callable, mesh: Mesh, *, batch_spec: Any = P(AXIS),
                  out_specs: Any = (P(), P()), donate: bool = True) -> Callable:
    """``jit(shard_map(step))``: state and key replicated, batch leaves split by ``batch_spec``
    (a PartitionSpec or a pytree prefix of them), outputs by ``out_specs``."""
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), batch_spec, P()), out_specs=out_specs)
    return jax.jit(sharded, donate_argnums=(0,) if donate else ())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))
