"""Train state, optimizer and the generic pure train step ``(state, batch, key) -> (state, metrics)``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.configs import check, non_negative, positive


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up, cosine decay and global-norm clipping.

    Attributes:
      learning_rate: peak learning rate after warm-up.
      warmup_steps: linear warm-up from 0 (the schedule then decays over the stage's steps).
      final_lr_frac: floor of the cosine decay as a fraction of the peak.
      weight_decay: decoupled weight decay on matrices (not biases, LayerNorm or scalar biases).
      b1, b2, eps: Adam moments.
      clip_norm: global gradient-norm clip (0 = off).
      on_nonfinite: a step whose loss or gradient is not finite is never applied; ``"stop"``
        ends the run with an error naming the step, ``"skip"`` counts it and goes on.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 20
    final_lr_frac: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    on_nonfinite: str = "stop"

    def __post_init__(self):
        positive(self, "learning_rate", "eps")
        non_negative(self, "warmup_steps", "weight_decay", "clip_norm")
        check(0.0 <= self.final_lr_frac <= 1.0, "final_lr_frac", "must be in [0, 1]")
        check(0.0 <= self.b1 < 1.0, "b1", "must be in [0, 1)")
        check(0.0 <= self.b2 < 1.0, "b2", "must be in [0, 1)")
        check(self.on_nonfinite in ("stop", "skip"), "on_nonfinite",
              f"must be 'stop' or 'skip', got {self.on_nonfinite!r}")


def warmup_cosine(peak: float | jax.Array, cfg: OptimConfig, total_steps: int):
    """``optax.warmup_cosine_decay_schedule`` from 0 to ``peak`` and down to
    ``peak · final_lr_frac``, built from the same optax pieces so the values are the same to the
    bit, but with ``peak`` allowed to be a traced array (optax's own helper branches on it)."""
    # optax needs a decay phase after the warm-up: when the warm-up fills the stage, one step past
    # its end that is never reached
    decay_steps = max(total_steps, cfg.warmup_steps + 1)
    return optax.join_schedules([
        optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=cfg.warmup_steps),
        optax.cosine_decay_schedule(init_value=peak, decay_steps=decay_steps - cfg.warmup_steps,
                                    alpha=cfg.final_lr_frac)], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig, total_steps: int, *, frozen=None
                   ) -> optax.GradientTransformation:
    """AdamW + clipping with warm-up then cosine decay over ``total_steps`` (see OptimConfig).

    The peak learning rate is a traced value in the optimizer state (``optax.inject_hyperparams``;
    read it as ``learning_rate(opt_state)``), not a constant of the compiled step, so runs that
    differ only in the learning rate share one compiled program. ``frozen(params)`` (optional): a
    tree of bools marking the parameters a loss keeps frozen (``stop_gradient``); weight decay
    skips them, since their zero gradient alone would leave them in place but the decoupled decay
    would still shrink them."""
    check(cfg.warmup_steps <= total_steps, "warmup_steps",
          f"{cfg.warmup_steps} exceeds the stage's {total_steps} steps")

    def decay_mask(params):
        still = jax.tree.map(lambda _: False, params) if frozen is None else frozen(params)
        return jax.tree.map(lambda x, f: x.ndim >= 2 and not f, params, still)

    def adamw(learning_rate):
        return optax.adamw(warmup_cosine(learning_rate, cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)

    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    chain.append(optax.inject_hyperparams(adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=cfg.learning_rate))
    return optax.chain(*chain)


def learning_rate(opt_state) -> jax.Array:
    """The peak learning rate held in a :func:`make_optimizer` state (a traced scalar)."""
    return opt_state[-1].hyperparams["learning_rate"]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: parameters, optimizer state and the step count (a pytree)."""

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)

    def apply_gradients(self, grads) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state)


LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def apply_if_finite(state: TrainState, grads, loss: jax.Array, grad_norm: jax.Array
                    ) -> tuple[TrainState, jax.Array]:
    """``state.apply_gradients(grads)`` when ``loss`` and ``grad_norm`` are finite; otherwise the
    same state with only ``step`` advanced (the data position moves on). Returns ``finite`` too."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new, kept = state.apply_gradients(grads), state.replace(step=state.step + 1)
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept), finite


def make_train_step(loss_fn: LossFn):
    """A pure step ``(state, batch, key) -> (state, metrics)`` for ``loss_fn(params, batch, key)``.

    Metrics are the loss's own plus ``grad_norm`` (before clipping) and ``finite`` (1 when the
    update was applied; a non-finite loss or gradient leaves the parameters and optimizer state
    unchanged). The caller jits the step where it is called, donating the state:
    ``jax.jit(step, donate_argnums=0)``.
    """

    def step(state: TrainState, batch, key):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch,
                                                                           key)
        norm = optax.tree.norm(grads)
        state, finite = apply_if_finite(state, grads, loss, norm)
        return state, dict(metrics, grad_norm=norm, finite=finite.astype(jnp.float32))

    return step
