"""Scalar hyperparameters are traced inputs, not constants of the compiled programs: two configs
that differ only in them lower to the same program (one compilation serves a sweep), one executable
runs both, and traced values give the numbers the same values as compile-time constants give."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from test_ppo import _setup

from rlhf_jax.rl.ppo import TRACED, Models, PPOHParams, make_iteration
from rlhf_jax.stages.ppo import PPOConfig, init_state
from rlhf_jax.train import OptimConfig, TrainState, learning_rate, make_optimizer


def _optax_reference(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer as it was built with the learning rate a constant (optax's own schedule)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.final_lr_frac)
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay,
                             mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    return optax.chain(*chain)


def _step(state, grads):
    return state.apply_gradients(grads)


def test_learning_rate_is_traced_and_the_updates_equal_optax_bit_for_bit():
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32),
              "b": jnp.linspace(-1.0, 1.0, 3)}
    grads = lambda p, i: jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p)  # noqa: E731
    step = jax.jit(_step)
    for cfg, total in ((OptimConfig(warmup_steps=4), 12),         # warm-up, cosine to 0.1
                       (OptimConfig(learning_rate=5e-5, warmup_steps=4, final_lr_frac=1.0,
                                    weight_decay=0.0), 12),       # PPO's default
                       (OptimConfig(learning_rate=2e-3, warmup_steps=0, clip_norm=0.0), 8)):
        ours, ref = (TrainState.create(params, make_optimizer(cfg, total)),
                     TrainState.create(params, _optax_reference(cfg, total)))
        for i in range(total + 2):                                # past the end of the decay
            ours, ref = step(ours, grads(ours.params, i)), step(ref, grads(ref.params, i))
            jax.tree.map(np.testing.assert_array_equal, ours.params, ref.params)
        assert float(learning_rate(ours.opt_state)) == np.float32(cfg.learning_rate)
    # two learning rates: the same program (a constant would differ in the lowered text)
    def text(**optim):
        tx = make_optimizer(OptimConfig(warmup_steps=2, **optim), 10)
        return jax.jit(_step).lower(TrainState.create(params, tx), params).as_text()

    assert text(learning_rate=1e-3) == text(learning_rate=3e-4)
    assert text(learning_rate=1e-3, clip_norm=0.0) != text(learning_rate=1e-3)   # structural


def _ppo(hp: PPOHParams, lr: float = 1e-3, **overrides):
    """``(models, state, frozen, batch)`` for one tiny PPO iteration, built as the stage builds
    them (``init_state``: the traced scalars in ``state.hparams``)."""
    models, p_params, _, rm_params, _, prompts, pmask = _setup()
    models = Models(policy=models.policy, ref=models.policy, rm=models.rm, value=models.value)
    optim = OptimConfig(learning_rate=lr, warmup_steps=1)
    cfg = PPOConfig(ppo=hp, iterations=2, policy_optim=optim, value_optim=optim, **overrides)
    state, frozen = init_state(models, p_params, rm_params, cfg)
    batch = {"prompts": prompts, "prompt_mask": pmask, "example_ids": jnp.arange(8)}
    return models, state, frozen, batch


BASE = dict(prompts_per_iter=8, epochs=1, minibatches=2, adaptive_kl=True, entropy_target=0.3)
# every traced scalar changed at once (β, the entropy controller's state and both learning rates
# too)
OTHER = dict(clip_eps=0.1, vf_coef=0.3, discount=0.9, gae_lambda=0.8, kl_target=2.0,
             kl_horizon=500.0, no_eos_penalty=0.25, kl_coef=0.2, entropy_target=0.5,
             entropy_kp=0.5, entropy_ki=0.05, entropy_coef_max=0.2, entropy_coef=0.01)


def test_ppo_iteration_compiles_once_for_configs_that_differ_only_in_scalars():
    """The sweep's case: each cell builds its own iteration. Cells that differ only in traced
    scalars lower to the same program text, which is what the persistent compilation cache keys
    on, so the program compiles once. The same cell with its scalars as compile-time constants
    (``state.hparams=None``, as before they were traced) lowers to another program: this check
    fails as soon as any of them is closed over again. (Traced and constant values give the same
    numbers: the stage's end-to-end runs are bit-identical to the constant build; test_ppo checks
    the constant build against the iteration's pieces.)"""
    assert set(OTHER) >= set(TRACED) - {"ptx_coef", "tis_cap"}   # 0 ↔ non-zero: structural
    kw = dict(max_new_tokens=6, eos_id=2, pad_id=0)
    hp_a, hp_b = PPOHParams(**BASE), PPOHParams(**{**BASE, **OTHER})
    models, state_a, frozen, batch = _ppo(hp_a)
    _, state_b, _, _ = _ppo(hp_b, lr=3e-4)
    key = jax.random.key(3)

    def text(hp, state):
        return jax.jit(make_iteration(models, hp, **kw)).lower(state, frozen, batch,
                                                               key).as_text()

    traced = text(hp_a, state_a)
    assert text(hp_b, state_b) == traced
    assert text(hp_b, state_b.replace(hparams=None)) != traced
