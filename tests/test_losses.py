"""Next-token losses and the generic train step."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import references as ref
from rlhf_jax.configs import ConfigError
from rlhf_jax.losses import lm_loss_fn, lm_with_replay_loss_fn, next_token_loss
from rlhf_jax.models import create_model, preset
from rlhf_jax.train import OptimConfig, TrainState, make_optimizer, make_train_step

B, T = 4, 12


def _logits_targets_mask(seed, shape=(3, 7), vocab=11):
    rng = np.random.default_rng(seed)
    logits = (2 * rng.normal(size=shape + (vocab,))).astype(np.float32)
    targets = rng.integers(0, vocab, size=shape).astype(np.int32)
    mask = (rng.random(shape) < 0.6).astype(np.int32)
    mask[0, 0] = 1
    hit = rng.random(shape) < 0.4          # targets that are the argmax, so accuracy is not ~1/V
    targets = np.where(hit, logits.argmax(-1), targets).astype(np.int32)
    return logits, targets, mask


@pytest.mark.parametrize("seed", range(3))
def test_next_token_loss_matches_numpy(seed):
    logits, targets, mask = _logits_targets_mask(seed)
    loss, metrics = next_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    want = ref.next_token_nll(logits, targets, mask)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["perplexity"]), np.exp(want), rtol=1e-5)
    assert float(metrics["tokens"]) == mask.sum()
    acc = ref.masked_mean(logits.argmax(-1) == targets, mask)
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)


def test_next_token_loss_masked_equals_sliced():
    logits, targets, mask = _logits_targets_mask(5)
    sel = mask.astype(bool)
    loss, _ = next_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    sliced, _ = next_token_loss(jnp.asarray(logits[sel][None]), jnp.asarray(targets[sel][None]),
                                jnp.ones((1, sel.sum()), jnp.int32))
    np.testing.assert_allclose(float(loss), float(sliced), rtol=1e-6)
    # changing logits / targets outside the mask changes nothing
    logits2, targets2 = logits.copy(), targets.copy()
    logits2[~sel] = 50.0 * np.random.default_rng(0).normal(size=logits2[~sel].shape)
    targets2[~sel] = 0
    loss2, _ = next_token_loss(jnp.asarray(logits2), jnp.asarray(targets2), jnp.asarray(mask))
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)


def test_next_token_loss_axis_name_split_equals_whole():
    logits, targets, mask = _logits_targets_mask(6, (6, 5))
    mask[3:] = 0
    mask[4, 0] = 1       # shards with very different token counts
    whole, _ = next_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    split = jax.jit(jax.vmap(lambda a, b, c: next_token_loss(a, b, c, axis_name="d")[0],
                             axis_name="d"))(
        jnp.asarray(logits).reshape(2, 3, 5, -1), jnp.asarray(targets).reshape(2, 3, 5),
        jnp.asarray(mask).reshape(2, 3, 5))
    np.testing.assert_allclose(np.asarray(split), [float(whole)] * 2, rtol=1e-6)


# --------------------------------------------------------------------------- with the model
@pytest.fixture(scope="module")
def lm():
    cfg = preset("test")
    model, params = create_model(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=(B, T)).astype(np.int32)
    attn = np.ones((B, T), np.int32)
    attn[1, :3] = 0                     # a left-padded row (prompt padding)
    attn[2, -2:] = 0                    # a right-padded row
    loss_mask = attn.copy()
    loss_mask[0, :5] = 0                # SFT-style: the loss on the response only
    batch = {"tokens": tokens, "attention_mask": attn, "loss_mask": loss_mask}
    loss_fn = functools.partial(lm_loss_fn, model=model)
    return cfg, model, params, batch, loss_fn


@pytest.fixture(scope="module")
def compiled(lm):
    """Jitted loss and value-and-grad, shared so each compiles once."""
    cfg, model, params, batch, loss_fn = lm
    return jax.jit(loss_fn), jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def test_lm_loss_fn_matches_numpy_forward(lm, compiled):
    cfg, model, params, batch, loss_fn = lm
    loss, metrics = compiled[0](params, batch)
    logits, _, _ = ref.gpt_forward(params, cfg, batch["tokens"], batch["attention_mask"])
    want = ref.next_token_nll(logits[:, :-1], batch["tokens"][:, 1:], batch["loss_mask"][:, 1:])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["tokens"]) == batch["loss_mask"][:, 1:].sum()


def test_next_token_loss_jit_equals_no_jit():
    logits, targets, mask = _logits_targets_mask(8)
    args = tuple(jnp.asarray(a) for a in (logits, targets, mask))
    chex.assert_trees_all_close(jax.jit(next_token_loss)(*args), next_token_loss(*args),
                                rtol=1e-6, atol=1e-7)


def test_lm_loss_grads_finite_and_nonzero(lm, compiled):
    cfg, model, params, batch, loss_fn = lm
    (loss, _), g_j = compiled[1](params, batch)
    np.testing.assert_allclose(float(loss), float(compiled[0](params, batch)[0]), rtol=1e-6)
    chex.assert_tree_all_finite(g_j)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(g_j)]
    assert all(n > 0 for n in norms)     # every parameter receives gradient


def test_lm_loss_gradient_matches_finite_difference(lm, compiled):
    """Directional derivative along a random unit direction vs a central difference (float32,
    so a loose tolerance)."""
    cfg, model, params, batch, loss_fn = lm
    f = lambda p: compiled[0](p, batch)[0]  # noqa: E731
    (_, _), g = compiled[1](params, batch)
    # host-side (NumPy) arithmetic: no extra compiles for the perturbed parameter trees
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(1)
    raw = [rng.normal(size=x.shape) for x in leaves]
    norm = np.sqrt(sum(np.sum(r ** 2) for r in raw))
    d = [(r / norm).astype(np.float32) for r in raw]
    eps = 1e-2
    plus = jax.tree.unflatten(treedef, [np.asarray(x) + eps * v for x, v in zip(leaves, d)])
    minus = jax.tree.unflatten(treedef, [np.asarray(x) - eps * v for x, v in zip(leaves, d)])
    fd = (float(f(plus)) - float(f(minus))) / (2 * eps)
    an = sum(float(np.vdot(np.asarray(a, np.float64), b)) for a, b in zip(jax.tree.leaves(g), d))
    np.testing.assert_allclose(an, fd, rtol=2e-2, atol=1e-3)


def test_replay_loss_is_sft_plus_coef_times_ptx(lm):
    cfg, model, params, batch, loss_fn = lm
    ptx = {k: np.roll(v, 1, axis=0) for k, v in batch.items()}
    ptx["loss_mask"] = ptx["attention_mask"]
    f = jax.jit(functools.partial(lm_with_replay_loss_fn, model=model, ptx_coef=0.25))
    total, m = f(params, {"sft": batch, "ptx": ptx})
    sft = ref.next_token_nll(ref.gpt_forward(params, cfg, batch["tokens"],
                                             batch["attention_mask"])[0][:, :-1],
                             batch["tokens"][:, 1:], batch["loss_mask"][:, 1:])
    ptx_l = ref.next_token_nll(ref.gpt_forward(params, cfg, ptx["tokens"],
                                               ptx["attention_mask"])[0][:, :-1],
                               ptx["tokens"][:, 1:], ptx["loss_mask"][:, 1:])
    np.testing.assert_allclose(float(total), sft + 0.25 * ptx_l, rtol=1e-5)
    np.testing.assert_allclose(float(m["sft_loss"]), sft, rtol=1e-5)
    np.testing.assert_allclose(float(m["ptx_loss"]), ptx_l, rtol=1e-5)
    assert float(m["loss"]) == float(total)


def test_train_step_decreases_loss_and_keeps_copies(lm, compiled):
    cfg, model, params, batch, loss_fn = lm
    steps = 30
    tx = make_optimizer(OptimConfig(learning_rate=3e-3, warmup_steps=3), steps)
    # TrainState.create does not copy: donating a state built on `params` itself would delete the
    # caller's (here: the fixture's) parameter buffers, so build it on a copy
    state = TrainState.create(jax.tree.map(jnp.copy, params), tx)
    before = jax.tree.map(np.array, state)                  # host snapshot
    keep = jax.tree.map(jnp.copy, state)                    # device copy that is not donated
    step = jax.jit(make_train_step(loss_fn), donate_argnums=0)
    (loss0, _), g0 = compiled[1](params, batch)
    grad_norm0 = np.sqrt(sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(g0)))
    losses = []
    first_leaf = jax.tree.leaves(state.params)[0]
    for i in range(steps):
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
        assert np.isfinite(float(metrics["grad_norm"]))
        if i == 0:   # metrics of the first step: loss and pre-clipping global gradient norm
            np.testing.assert_allclose(losses[0], float(loss0), rtol=1e-6)
            np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm0, rtol=1e-4)
    assert first_leaf.is_deleted()                          # the input state really was donated
    assert int(state.step) == steps
    assert losses[-1] < 0.7 * losses[0], losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # the copy and the fixture's params are untouched
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, keep), before)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), before.params)
    final, _ = compiled[0](state.params, batch)
    assert float(final) < losses[0]


def test_weight_decay_skips_vectors():
    """With zero gradients AdamW only decays: matrices shrink, biases / LayerNorm stay."""
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}
    tx = make_optimizer(OptimConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5), 10)
    state = TrainState.create(params, tx)
    state = jax.jit(lambda s, g: s.apply_gradients(g))(state, jax.tree.map(jnp.zeros_like, params))
    np.testing.assert_allclose(np.asarray(state.params["w"]), 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.params["b"]), 1.0)


@pytest.mark.parametrize("kw, field", [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(b2=1.0), "b2"),
    (dict(final_lr_frac=2.0), "final_lr_frac"),
])
def test_optim_config_validation_names_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        OptimConfig(**kw)


def test_make_optimizer_rejects_warmup_longer_than_stage():
    with pytest.raises(ConfigError, match="warmup_steps"):
        make_optimizer(OptimConfig(warmup_steps=50), 10)
