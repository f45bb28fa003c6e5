"""Data parallelism: the pmap programming model expressed with ``jax.shard_map`` over a mesh.

Step functions are written per shard: they see their slice of the batch and reduce every batch
statistic over the mesh axis ``"data"`` (``ops.masked_mean(..., axis_name="data")`` psums sums and
counts). Parameters and optimizer state are replicated by default; because they are unvarying over
the mesh axis, ``jax.grad`` of a loss built from psum-ed statistics already returns the psum of the
shards' contributions — the full-batch gradient — on every device, so updates stay identical.

With ``fsdp=True`` (:func:`fsdp_specs`), each parameter and its optimizer moments are split over
the mesh along their largest divisible dimension; the step all-gathers the parameters for the
forward pass, and the transpose of that all-gather reduce-scatters the gradients, so each device
updates only its slice (ZeRO-3 / FSDP). Gradient clipping uses the global norm.

Multi-host: :func:`initialize_distributed` connects the processes; the mesh spans every device of
every process; :func:`shard_batch` builds global arrays from which each process materialises only
the rows its own devices hold.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.configs import check
from rlhf_jax.train import apply_if_finite

AXIS = "data"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """``jax.distributed.initialize`` from arguments or the environment; returns whether it ran.

    Arguments default to ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; with ``RLHF_JAX_DISTRIBUTED=auto`` JAX detects the cluster itself (SLURM,
    Open MPI, Cloud TPU). On CPU the cross-process collectives use gloo."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    auto = os.environ.get("RLHF_JAX_DISTRIBUTED") == "auto"
    if not coordinator and not auto:
        return False
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every visible device, all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def check_divisible(n: int, mesh: Mesh, field: str, what: str = "global batch") -> None:
    """Config-time error naming ``field`` when ``n`` rows do not split evenly over the mesh."""
    size = mesh.shape[AXIS]
    check(n % size == 0, field, f"the {what} of {n} does not divide over {size} devices "
          f"(mesh axis '{AXIS}'); choose a multiple of {size}")


def data_parallel(step: Callable, mesh: Mesh, *, batch_spec: Any = P(AXIS), state_spec: Any = P(),
                  out_specs: Any = None, donate: bool = True, frozen_spec: Any = None) -> Callable:
    """``jit(shard_map(step))``: state split by ``state_spec`` (default replicated), key
    replicated, batch leaves split by ``batch_spec`` (a PartitionSpec or a pytree prefix of them),
    outputs by ``out_specs`` (a pytree prefix; default: state as it came in, metrics replicated).

    With ``frozen_spec`` the step is ``(state, frozen, batch, key)``: ``frozen`` (parameters it
    reads but never trains, e.g. PPO's reference and reward models) split by ``frozen_spec`` and
    never donated."""
    out_specs = (state_spec, P()) if out_specs is None else out_specs
    in_specs = (state_spec, batch_spec, P()) if frozen_spec is None else (
        state_spec, frozen_spec, batch_spec, P())
    sharded = jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return jax.jit(sharded, donate_argnums=(0,) if donate else ())


def place(tree: Any, mesh: Mesh, specs: Any = P()) -> Any:
    """Put ``tree`` on ``mesh`` split by ``specs`` (default: replicated on every device). Works
    across processes: every process passes the same full values and keeps only its slices."""
    def put(x, spec):
        sharding = NamedSharding(mesh, spec)
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    if isinstance(specs, P):
        return jax.tree.map(lambda x: put(x, specs), tree)
    return jax.tree.map(put, tree, specs)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of ``tree`` on every device of ``mesh``."""
    return place(tree, mesh, P())


def unshard(tree: Any, mesh: Mesh) -> Any:
    """The arrays of ``tree`` (e.g. FSDP shards) gathered and replicated on every device."""
    return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)


def shard_batch(batch: Any, mesh: Mesh, spec: Any = P(AXIS)) -> Any:
    """Host batch (NumPy, global rows) -> global arrays split by ``spec`` (a PartitionSpec or a
    pytree prefix of them). Each process copies only the rows its own devices hold."""
    if isinstance(spec, P):
        return place(batch, mesh, spec)
    return jax.tree.map(lambda s, b: place(b, mesh, s), spec, batch,
                        is_leaf=lambda s: isinstance(s, P))


def to_host(tree: Any) -> Any:
    """NumPy copies of (possibly multi-process) global arrays, gathered on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def single_device(tree: Any) -> Any:
    """Every array of ``tree`` whole on this process's first device: replicated or FSDP-split
    parameters of a sharded stage gathered for work that runs unsharded (the held-out
    evaluation), so they combine with parameters that never left one device (e.g. the frozen
    reference) in one jitted call, and that work runs the same program on any mesh."""
    leaves, treedef = jax.tree.flatten(tree)
    far = [i for i, x in enumerate(leaves)   # with shards on other processes' devices
           if isinstance(x, jax.Array) and not x.is_fully_addressable]
    for i, x in zip(far, to_host([leaves[i] for i in far]) if far else []):
        leaves[i] = x                        # gathered through the host (a collective)
    return jax.device_put(jax.tree.unflatten(treedef, leaves), jax.local_devices()[0])


# ---------------------------------------------------------------------------------------------
# FSDP: parameters and optimizer state split over the mesh
# ---------------------------------------------------------------------------------------------

def fsdp_specs(tree: Any, mesh: Mesh, *, min_size: int = 1024) -> Any:
    """PartitionSpecs splitting each array leaf of ``tree`` over ``"data"`` along its largest
    dimension divisible by the mesh size; small or indivisible leaves (and scalars) stay
    replicated."""
    n = mesh.shape[AXIS]

    def spec(x):
        shape = getattr(x, "shape", ())
        if n == 1 or int(np.prod(shape)) < min_size:
            return P()
        dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0]
        if not dims:
            return P()
        return P(*[AXIS if i == dims[0] else None for i in range(len(shape))])
    return jax.tree.map(spec, tree)


def _split_dim(spec: P) -> int | None:
    return next((i for i, a in enumerate(spec) if a == AXIS), None)


def gather_params(shards: Any, specs: Any) -> Any:
    """All-gather FSDP shards (inside ``shard_map``) into full parameters."""
    def gather(x, spec):
        d = _split_dim(spec)
        return x if d is None else lax.all_gather(x, AXIS, axis=d, tiled=True)
    return jax.tree.map(gather, shards, specs)


def global_norm(grads: Any, specs: Any) -> jax.Array:
    """L2 norm of a gradient tree whose leaves may be FSDP shards (inside ``shard_map``)."""
    sq = lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)))  # noqa: E731
    split = [sq(g) for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(specs,
             is_leaf=lambda s: isinstance(s, P))) if _split_dim(s) is not None]
    whole = [sq(g) for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(specs,
             is_leaf=lambda s: isinstance(s, P))) if _split_dim(s) is None]
    total = lax.psum(sum(split), AXIS) if split else 0.0
    return jnp.sqrt(total + (sum(whole) if whole else 0.0))


def make_fsdp_train_step(loss_fn: Callable, param_specs: Any, *, clip_norm: float):
    """The FSDP twin of :func:`rlhf_jax.train.make_train_step`, run per shard: the state's
    parameters and optimizer moments are shards (``param_specs``); gradients arrive
    reduce-scattered; clipping by the *global* norm happens here, so build the state's optimizer
    without its own clip (``OptimConfig(clip_norm=0)``: optax's clip would see only shards)."""

    def step(state, batch, key):
        full_loss = lambda shards: loss_fn(gather_params(shards, param_specs), batch, key)  # noqa: E731
        (loss, metrics), grads = jax.value_and_grad(full_loss, has_aux=True)(state.params)
        norm = global_norm(grads, param_specs)
        if clip_norm > 0:
            scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
            grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        state, finite = apply_if_finite(state, grads, loss, norm)
        return state, dict(metrics, grad_norm=norm, finite=finite.astype(jnp.float32))

    return step


def state_specs(state: Any, param_specs: Any) -> Any:
    """Specs for a ``TrainState``: the step replicated, parameters and every optimizer leaf shaped
    like a parameter split like it, other optimizer leaves (counts) replicated."""
    by_shape = {}
    for x, s in zip(jax.tree.leaves(state.params),
                    jax.tree.leaves(param_specs, is_leaf=lambda s: isinstance(s, P))):
        by_shape.setdefault(tuple(x.shape), s)
    return state.replace(
        step=P(), params=param_specs,
        opt_state=jax.tree.map(lambda x: by_shape.get(tuple(getattr(x, "shape", ())), P()),
                               state.opt_state))

