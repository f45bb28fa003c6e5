"""rlhf_jax.ops: masked reductions, token log-probs, entropy, positions — against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import references as ref
from rlhf_jax import ops


def _rand(seed, shape=(3, 7), p=0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    m = rng.random(shape) < p
    m[0, 0] = True  # at least one counted entry
    return x, m


@pytest.mark.parametrize("seed", range(5))
def test_masked_mean_matches_numpy(seed):
    x, m = _rand(seed, (4, 9), p=0.3 + 0.1 * seed)
    got = float(ops.masked_mean(jnp.asarray(x), jnp.asarray(m)))
    np.testing.assert_allclose(got, ref.masked_mean(x, m), rtol=1e-6, atol=1e-7)


def test_masked_mean_equals_mean_of_selected_elements():
    x, m = _rand(11, (5, 6))
    got = float(ops.masked_mean(jnp.asarray(x), jnp.asarray(m)))
    np.testing.assert_allclose(got, float(np.mean(x[m])), rtol=1e-6)
    # values outside the mask are ignored completely (even huge ones)
    x2 = np.where(m, x, 1e30).astype(np.float32)
    got2 = float(ops.masked_mean(jnp.asarray(x2), jnp.asarray(m)))
    np.testing.assert_allclose(got2, got, rtol=1e-6)


def test_masked_mean_along_axis():
    x, m = _rand(3, (4, 6))
    m[:, 0] = True
    got = np.asarray(ops.masked_mean(jnp.asarray(x), jnp.asarray(m), axis=1))
    want = np.array([x[i][m[i]].mean() for i in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_masked_mean_is_token_mean_not_mean_of_row_means():
    x = np.array([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]], np.float32)
    m = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], bool)
    # token mean (1+1+1+1+5)/5 = 1.8; a mean of row means would give 3.0
    np.testing.assert_allclose(float(ops.masked_mean(x, m)), 1.8, rtol=1e-6)


@pytest.mark.parametrize("cuts", [(3,), (2, 5), (1, 4)])
def test_sum_count_reduction_is_split_invariant(cuts):
    x, m = _rand(7, (6, 8), p=0.4)
    m[5] = False     # one shard may even be empty
    full = float(ops.masked_mean(jnp.asarray(x), jnp.asarray(m)))
    total, count = 0.0, 0.0
    for xs, ms in zip(np.split(x, cuts), np.split(m, cuts)):
        s, c = ops.masked_sum_and_count(jnp.asarray(xs), jnp.asarray(ms))
        total += float(s)
        count += float(c)
    np.testing.assert_allclose(total / count, full, rtol=1e-6)
    assert count == m.sum()
    # the naive mean of per-shard means differs in general (shards hold different counts)
    shard_means = [ref.masked_mean(xs, ms) for xs, ms in zip(np.split(x, cuts), np.split(m, cuts))]
    assert not np.isclose(np.mean(shard_means), full)


def test_all_false_mask_gives_zero_not_nan():
    x = jnp.ones((3, 4)) * 7.0
    m = jnp.zeros((3, 4), bool)
    out = ops.masked_mean(x, m)
    assert np.isfinite(float(out)) and float(out) == 0.0
    per_row = ops.masked_mean(x, m, axis=1)
    np.testing.assert_array_equal(np.asarray(per_row), np.zeros(3))
    g = jax.grad(lambda x: ops.masked_mean(x, m))(x)
    assert np.all(np.isfinite(np.asarray(g)))


def test_masked_var_matches_numpy():
    x, m = _rand(5, (4, 10), p=0.6)
    sel = x[m].astype(np.float64)
    np.testing.assert_allclose(float(ops.masked_var(x, m)), sel.var(), rtol=1e-5)
    np.testing.assert_allclose(float(ops.masked_var(x, m, unbiased=True)), sel.var(ddof=1),
                               rtol=1e-5)


def test_token_logprobs_matches_numpy():
    rng = np.random.default_rng(0)
    logits = (3 * rng.normal(size=(2, 5, 11))).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5))
    got = np.asarray(ops.token_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
    np.testing.assert_allclose(got, ref.token_logprobs(logits, targets), atol=1e-5)
    assert got.shape == (2, 5)
    # bf16 input is upcast before the log-sum-exp
    got16 = ops.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert got16.dtype == jnp.float32


def test_token_logprobs_large_logits_stable():
    logits = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    got = np.asarray(ops.token_logprobs(jnp.asarray(logits), jnp.array([0])))
    np.testing.assert_allclose(got, [0.0], atol=1e-6)
    got = np.asarray(ops.token_logprobs(jnp.asarray(logits), jnp.array([1])))
    np.testing.assert_allclose(got, [-1000.0], rtol=1e-6)


def test_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = (2 * rng.normal(size=(3, 4, 13))).astype(np.float32)
    got = np.asarray(ops.entropy_from_logits(jnp.asarray(logits)))
    np.testing.assert_allclose(got, ref.entropy(logits), atol=1e-5)
    # uniform -> log V; one-hot-like -> ~0
    np.testing.assert_allclose(float(ops.entropy_from_logits(jnp.zeros(13))), np.log(13), rtol=1e-6)
    peaked = jnp.array([100.0] + [0.0] * 12)
    assert float(ops.entropy_from_logits(peaked)) < 1e-6


def test_positions_left_and_right_padding():
    left = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    right = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    for m in (left, right):
        got = np.asarray(ops.positions_from_mask(jnp.asarray(m)))
        np.testing.assert_array_equal(got, ref.positions(m))
    np.testing.assert_array_equal(np.asarray(ops.positions_from_mask(jnp.asarray(left)))[0],
                                  [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(np.asarray(ops.positions_from_mask(jnp.asarray(right)))[0],
                                  [0, 1, 2, 2, 2])
    # real tokens of a left-padded row get the same ids as the unpadded row
    got = np.asarray(ops.positions_from_mask(jnp.asarray(left)))
    np.testing.assert_array_equal(got[0][left[0] == 1], np.arange(3))


@pytest.mark.parametrize("n_shards", [2, 3])
def test_masked_mean_axis_name_under_vmap_is_global(n_shards):
    x, m = _rand(9, (6, 5), p=0.35)
    m[0] = True        # shard 0 holds many tokens, others few: per-shard means would be biased
    m[-1] = False
    xs = jnp.asarray(x).reshape(n_shards, -1, 5)
    ms = jnp.asarray(m).reshape(n_shards, -1, 5)
    out = jax.vmap(lambda a, b: ops.masked_mean(a, b, axis_name="d"), axis_name="d")(xs, ms)
    want = ref.masked_mean(x, m)
    np.testing.assert_allclose(np.asarray(out), np.full(n_shards, want), rtol=1e-6)
    # and pmean-of-local-means would not equal it
    local = jax.vmap(lambda a, b: ops.masked_mean(a, b))(xs, ms)
    assert not np.isclose(float(jnp.mean(local)), want)
    var = jax.vmap(lambda a, b: ops.masked_var(a, b, axis_name="d"), axis_name="d")(xs, ms)
    np.testing.assert_allclose(np.asarray(var), np.full(n_shards, x[m].astype(np.float64).var()),
                               rtol=1e-5)
