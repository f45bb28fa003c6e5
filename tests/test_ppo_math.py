"""The pure PPO math against slow, independent references.

Covers ``rlhf_jax.rl.advantages`` (token rewards, GAE, whitening), ``rlhf_jax.losses.ppo`` (the
KL estimators, the clipped policy and value losses) and ``rlhf_jax.rl.kl_control`` (the adaptive
KL coefficient, running moments). References are Python loops, float64 NumPy, hand-worked numbers
or exact enumeration over a small vocabulary; nothing here reuses the library's formulas.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

from rlhf_jax.losses.ppo import (
    KL_ESTIMATORS,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_bonus,
    kl_loss,
    kl_per_token,
)
from rlhf_jax.ops import entropy_from_logits
from rlhf_jax.rl.advantages import gae, token_rewards, whiten
from rlhf_jax.rl.diagnostics import logprob_mismatch
from rlhf_jax.rl.kl_control import RunningMoments, adaptive_kl_coef

B, N = 8, 9          # batch rows, response tokens
V = 5                # vocabulary of the small categorical distributions
JIT = pytest.mark.parametrize("jit", [False, True], ids=["nojit", "jit"])


# --------------------------------------------------------------------------- helpers
_JITTED = {}


def _maybe_jit(fn, jit: bool, static_argnames=()):
    """``fn`` itself, or one shared ``jax.jit(fn)`` (compiled once per shape for the module)."""
    if not jit:
        return fn
    if fn not in _JITTED:
        _JITTED[fn] = jax.jit(fn, static_argnames=static_argnames)
    return _JITTED[fn]


def _lengths(rng, b=B, n=N) -> np.ndarray:
    """Random response lengths with an empty row (0) and a full-length row (n) among them."""
    lengths = rng.integers(1, n, size=b)
    lengths[0], lengths[1] = 0, n
    return lengths


def _right_padded(lengths, n=N) -> np.ndarray:
    return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def _random_mask(rng, shape=(B, N), p=0.6) -> np.ndarray:
    m = (rng.random(shape) < p).astype(np.int32)
    m[0, 0] = 1
    return m


def _garbage_on_padding(rng, x, mask, scale=1e3) -> np.ndarray:
    """``x`` on counted entries, large random junk elsewhere (must not leak into any result)."""
    junk = scale * rng.normal(size=x.shape)
    return np.where(mask.astype(bool), x, junk).astype(np.float32)


def _dyadic(x, bits=8) -> np.ndarray:
    """Round to multiples of 2⁻ᵇⁱᵗˢ: sums, differences and squares of such small numbers are
    exact in float32, so float32 and float64 agree on ties."""
    return (np.round(np.asarray(x) * 2**bits) / 2**bits).astype(np.float32)


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


# --------------------------------------------------------------------------- NumPy references
def _gae_loops(rewards, values, lengths, discount, gae_lambda):
    """GAE by a double loop: per row, backwards over the ``L`` counted tokens; the episode ends
    at token ``L − 1`` (no bootstrap past it)."""
    adv = np.zeros(rewards.shape, np.float64)
    ret = np.zeros(rewards.shape, np.float64)
    for b, length in enumerate(lengths):
        running = 0.0
        for t in reversed(range(length)):
            next_v = float(values[b, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[b, t]) + discount * next_v - float(values[b, t])
            running = delta + discount * gae_lambda * running
            adv[b, t] = running
            ret[b, t] = running + float(values[b, t])
    return adv, ret


def _policy_loss_ref(logp, old_logp, adv, mask, eps):
    logp, old_logp, adv = (np.asarray(a, np.float64) for a in (logp, old_logp, adv))
    r = np.exp(logp - old_logp)
    per_tok = np.maximum(-adv * r, -adv * np.clip(r, 1 - eps, 1 + eps))
    # The clipped term is the active one exactly when the ratio left the trust region in the
    # direction the advantage pushes it.
    blocked = ((adv > 0) & (r > 1 + eps)) | ((adv < 0) & (r < 1 - eps))
    count = mask.sum()
    grad = np.where(blocked, 0.0, -adv * r) * mask / count        # d loss / d logp
    return {
        "policy_loss": ref.masked_mean(per_tok, mask),
        "clip_frac": ref.masked_mean(blocked, mask),
        "approx_kl": ref.masked_mean(r - 1 - np.log(r), mask),
        "ratio": ref.masked_mean(r, mask),
    }, blocked, grad


def _value_loss_ref(values, old_values, returns, mask, eps):
    v, v_old, R = (np.asarray(a, np.float64) for a in (values, old_values, returns))
    err = (v - R) ** 2
    if eps == 0:
        return 0.5 * ref.masked_mean(err, mask), 0.0, (v - R) * mask / mask.sum()
    v_clip = v_old + np.clip(v - v_old, -eps, eps)
    err_c = (v_clip - R) ** 2
    clipped = err_c > err
    grad = np.where(clipped, 0.0, v - R) * mask / mask.sum()
    return 0.5 * ref.masked_mean(np.maximum(err, err_c), mask), ref.masked_mean(clipped, mask), grad


def _kl_np(p_logits, q_logits) -> float:
    """KL(p ‖ q) = Σ p (log p − log q), float64."""
    lp, lq = ref.log_softmax(p_logits), ref.log_softmax(q_logits)
    return float(np.sum(np.exp(lp) * (lp - lq)))


def _ziegler_coef(beta, kl, target, horizon, n_steps) -> float:
    e = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + e * n_steps / horizon)


# --------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("discount, gae_lambda", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("seed", [0])
@JIT
def test_gae_matches_python_double_loop(seed, discount, gae_lambda, jit):
    """Advantages and returns equal a per-row backwards loop on right-padded rows of random
    lengths (one empty, one full); padding is zero and its (junk) rewards/values are ignored."""
    rng = np.random.default_rng(seed)
    lengths = _lengths(rng)
    mask = _right_padded(lengths)
    rewards = _garbage_on_padding(rng, rng.normal(size=(B, N)), mask)
    values = _garbage_on_padding(rng, rng.normal(size=(B, N)), mask)
    adv, ret = _maybe_jit(gae, jit)(*_f32(rewards, values), jnp.asarray(mask),
                                    discount=discount, gae_lambda=gae_lambda)
    want_adv, want_ret = _gae_loops(rewards, values, lengths, discount, gae_lambda)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
    counted = mask.astype(bool)
    # returns = advantages + values on counted tokens, exactly zero on padding
    np.testing.assert_allclose(np.asarray(ret)[counted], (np.asarray(adv) + values)[counted],
                               rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(adv)[~counted] == 0) and np.all(np.asarray(ret)[~counted] == 0)
    if (discount, gae_lambda) == (1.0, 1.0):
        # Monte-Carlo advantage: reward-to-go minus the baseline
        to_go = np.flip(np.cumsum(np.flip(np.where(counted, rewards, 0.0), 1), 1), 1)
        np.testing.assert_allclose(np.asarray(adv)[counted], (to_go - values)[counted],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ret)[counted], to_go[counted], rtol=1e-5, atol=1e-5)


def test_gae_hand_worked():
    """γ = λ = ½, rewards (1, 2), values (1, 1), then padding:
    δ₁ = 2 − 1 = 1, δ₀ = 1 + ½·1 − 1 = ½; A₁ = 1, A₀ = ½ + ¼·1 = ¾; R = A + V."""
    rewards = jnp.array([[1.0, 2.0, 7.0]])
    values = jnp.array([[1.0, 1.0, 5.0]])
    mask = jnp.array([[1, 1, 0]])
    adv, ret = gae(rewards, values, mask, discount=0.5, gae_lambda=0.5)
    np.testing.assert_allclose(np.asarray(adv), [[0.75, 1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ret), [[1.75, 2.0, 0.0]], rtol=1e-6)


# --------------------------------------------------------------------------- whitening
@pytest.mark.parametrize("seed", range(2))
@JIT
def test_whiten_matches_numpy(seed, jit):
    """Counted entries become (x − mean)/std with the population std of the counted entries
    (mean 0, std 1); masked entries are 0. ``shift_mean=False`` rescales but keeps the mean."""
    rng = np.random.default_rng(seed)
    mask = _random_mask(rng)
    x = _garbage_on_padding(rng, 3.0 + 2.5 * rng.normal(size=(B, N)), mask)
    sel = mask.astype(bool)
    mu, sd = float(np.mean(x[sel].astype(np.float64))), float(np.std(x[sel].astype(np.float64)))

    fn = _maybe_jit(whiten, jit, static_argnames="shift_mean")
    out = np.asarray(fn(jnp.asarray(x), jnp.asarray(mask)))
    assert np.all(out[~sel] == 0)
    np.testing.assert_allclose(out[sel], (x[sel] - mu) / sd, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[sel].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[sel].std(), 1.0, rtol=1e-4)

    keep = np.asarray(fn(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))
    assert np.all(keep[~sel] == 0)
    np.testing.assert_allclose(keep[sel], (x[sel] - mu) / sd + mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(keep[sel].mean(), mu, rtol=1e-4)
    np.testing.assert_allclose(keep[sel].std(), 1.0, rtol=1e-4)


def test_whiten_axis_name_split_equals_whole():
    """Under data parallelism the statistics are global: two shards with very different token
    counts whiten exactly as the whole batch does."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, N)).astype(np.float32)
    mask = _right_padded([N, 2, 1, 0])
    whole = whiten(jnp.asarray(x), jnp.asarray(mask))
    split = jax.jit(jax.vmap(lambda a, m: whiten(a, m, axis_name="d"), axis_name="d"))(
        jnp.asarray(x).reshape(2, 2, N), jnp.asarray(mask).reshape(2, 2, N))
    np.testing.assert_allclose(np.asarray(split).reshape(4, N), np.asarray(whole),
                               rtol=1e-5, atol=1e-6)


def test_logprob_mismatch_matches_numpy_and_is_global():
    """Max and masked mean of |sampler − trainer| log-probs over response tokens, reduced over
    shards of different token counts exactly as over the whole batch."""
    rng = np.random.default_rng(3)
    a, b = (rng.normal(size=(4, N)).astype(np.float32) for _ in range(2))
    mask = _right_padded([N, 2, 1, 0])
    a[3] = 100.0                                      # padding never counts
    d = np.abs(a.astype(np.float64) - b)[mask > 0]
    whole = logprob_mismatch(jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask))
    split = jax.jit(jax.vmap(lambda x, y, m: logprob_mismatch(x, y, m, axis_name="d"),
                             axis_name="d"))(*(jnp.asarray(v).reshape(2, 2, N)
                                               for v in (a, b, mask)))
    for m in (whole, jax.tree.map(lambda v: v[0], split)):
        np.testing.assert_allclose(float(m["rollout/logprob_max_diff"]), d.max(), rtol=1e-6)
        np.testing.assert_allclose(float(m["rollout/logprob_mean_diff"]), d.mean(), rtol=1e-5)


# --------------------------------------------------------------------------- token rewards
@pytest.mark.parametrize("seed", range(2))
@JIT
def test_token_rewards_matches_loop(seed, jit):
    """−β·KL on every counted token, the score added at each row's last counted token, nothing
    on padding (whatever the KL there); an empty row gets nothing at all."""
    rng = np.random.default_rng(seed)
    lengths = _lengths(rng)
    mask = _right_padded(lengths)
    kl = _garbage_on_padding(rng, rng.normal(size=(B, N)), mask)
    scores = rng.normal(size=B).astype(np.float32) * 3
    beta = 0.13
    want = np.zeros((B, N))
    for b, length in enumerate(lengths):
        for t in range(length):
            want[b, t] = -beta * kl[b, t]
        if length > 0:
            want[b, length - 1] += scores[b]
    got = np.asarray(_maybe_jit(token_rewards, jit)(
        jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(mask), kl_coef=jnp.float32(beta)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[0] == 0)                         # the empty row
    np.testing.assert_allclose(got.sum(1), scores * (lengths > 0)
                               - beta * np.where(mask, kl, 0).sum(1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- policy loss
def _policy_inputs(seed):
    rng = np.random.default_rng(seed)
    mask = _random_mask(rng)
    old_logp = (-1.0 - rng.exponential(size=(B, N))).astype(np.float32)
    logp = (old_logp + 0.4 * rng.normal(size=(B, N))).astype(np.float32)  # ratios ~ e^{±0.4}
    adv = rng.normal(size=(B, N)).astype(np.float32)
    return logp, old_logp, adv, mask


@pytest.mark.parametrize("clip_eps", [0.1, 0.2])
@pytest.mark.parametrize("seed", range(2))
@JIT
def test_clipped_policy_loss_matches_numpy(seed, clip_eps, jit):
    """Loss and metrics equal the NumPy reference on inputs with both signs of advantage and
    ratios on both sides of [1 − ε, 1 + ε]."""
    logp, old_logp, adv, mask = _policy_inputs(seed)
    want, blocked, _ = _policy_loss_ref(logp, old_logp, adv, mask, clip_eps)
    counted = mask.astype(bool)
    # the inputs exercise both clipping directions
    assert np.any(blocked & counted & (adv > 0)) and np.any(blocked & counted & (adv < 0))
    fn = _maybe_jit(clipped_policy_loss, jit, static_argnames="clip_eps")
    loss, metrics = fn(*_f32(logp, old_logp, adv), jnp.asarray(mask), clip_eps=clip_eps)
    np.testing.assert_allclose(float(loss), want["policy_loss"], rtol=1e-5, atol=1e-6)
    for name, value in want.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@jax.jit
def _policy_grad(logp, old_logp, adv, mask):
    return jax.grad(lambda lp: clipped_policy_loss(lp, old_logp, adv, mask, clip_eps=0.2)[0])(logp)


@pytest.mark.parametrize("seed", range(2))
def test_clipped_policy_loss_gradient(seed):
    """d loss / d logp is −A·ρ/n on counted tokens, except exactly 0 where the ratio left the
    clip range in the direction clipping blocks (A > 0, ρ > 1 + ε or A < 0, ρ < 1 − ε); padding
    gets no gradient."""
    eps = 0.2
    logp, old_logp, adv, mask = _policy_inputs(seed)
    _, blocked, want = _policy_loss_ref(logp, old_logp, adv, mask, eps)
    grad = np.asarray(_policy_grad(*_f32(logp, old_logp, adv), jnp.asarray(mask)))
    counted = mask.astype(bool)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    assert np.any(blocked & counted)
    assert np.all(grad[blocked] == 0) and np.all(grad[~counted] == 0)
    assert np.all(grad[counted & ~blocked] != 0)
    # ratios outside the range in the *unblocked* direction still get gradient (the min keeps
    # the unclipped, more pessimistic term)
    r = np.exp(logp - old_logp)
    unblocked_out = counted & (((adv > 0) & (r < 1 - eps)) | ((adv < 0) & (r > 1 + eps)))
    assert np.any(unblocked_out) and np.all(grad[unblocked_out] != 0)


def test_clipped_policy_loss_hand_worked():
    """Four tokens, ε = 0.2, A = (1, 1, −1, −1), ρ = (1.5, 0.5, 0.5, 1.5):
    per-token max(−Aρ, −A·clip ρ) = (−1.2, −0.5, 0.8, 1.5); mean 0.15; two clipped tokens."""
    ratio = np.array([[1.5, 0.5, 0.5, 1.5]])
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0]])
    loss, m = clipped_policy_loss(jnp.asarray(np.log(ratio), jnp.float32), jnp.zeros((1, 4)), adv,
                                  jnp.ones((1, 4)), clip_eps=0.2)
    np.testing.assert_allclose(float(loss), 0.15, rtol=1e-5)
    np.testing.assert_allclose(float(m["clip_frac"]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(m["ratio"]), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------- value loss
@functools.partial(jax.jit, static_argnums=4)
def _value_grad(values, old_values, returns, mask, clip_eps):
    return jax.grad(lambda v: clipped_value_loss(v, old_values, returns, mask,
                                                 clip_eps=clip_eps)[0])(values)


@pytest.mark.parametrize("clip_eps", [0.0, 0.2])
@pytest.mark.parametrize("seed", range(2))
@JIT
def test_clipped_value_loss_matches_numpy(seed, clip_eps, jit):
    """½·token-mean of max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²), or plain ½ MSE with
    ε = 0; clip fraction and the gradient w.r.t. V (0 where the clipped branch wins). Inputs are
    multiples of 2⁻⁸ so float32 differences are exact (see the rounding-tie test below)."""
    rng = np.random.default_rng(seed)
    mask = _random_mask(rng)
    old_v = _dyadic(rng.normal(size=(B, N)))
    v = _dyadic(old_v + 0.4 * rng.normal(size=(B, N)))
    R = _dyadic(old_v + rng.normal(size=(B, N)))
    want_loss, want_frac, want_grad = _value_loss_ref(v, old_v, R, mask, clip_eps)
    if clip_eps > 0:
        assert 0 < want_frac < 1
    fn = _maybe_jit(clipped_value_loss, jit, static_argnames="clip_eps")
    loss, metrics = fn(*_f32(v, old_v, R), jnp.asarray(mask), clip_eps=clip_eps)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["value_loss"]), want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["value_clip_frac"]), want_frac, rtol=1e-6)
    grad = _value_grad(*_f32(v, old_v, R), jnp.asarray(mask), clip_eps)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)


def test_value_clip_frac_ignores_rounding_ties():
    """A token with |V − V_old| = 0.071 < ε = 0.2 is not clipped: the clip fraction is 0. (In
    float32, 0.096 + (0.025 − 0.096) is 2⁻²⁹ below 0.025, which makes the 'clipped' error larger
    by rounding; such a tie must not count.)"""
    one = lambda x: jnp.full((1, 1), x, jnp.float32)
    loss, metrics = clipped_value_loss(one(0.025), one(0.096), one(0.2), jnp.ones((1, 1)),
                                       clip_eps=0.2)
    np.testing.assert_allclose(float(loss), 0.5 * (0.2 - 0.025) ** 2, rtol=1e-5)
    assert float(metrics["value_clip_frac"]) == 0.0


# --------------------------------------------------------------------------- KL estimators
def _categorical(seed):
    """Random policy logits θ [V] and fixed SFT logits φ [V]."""
    theta = 1.5 * np.random.default_rng(100 + seed).normal(size=V)
    phi = np.array([0.3, -1.0, 1.2, 0.0, -0.4])
    return theta, phi


def _estimator_expectation(theta, phi, estimator):
    """g(θ) = Σ_y sg(π_θ(y))·k(log π_θ(y), log π_SFT(y)): the expected value of the estimator
    used as a loss on on-policy samples. Computed with ``kl_loss`` over a row of all V tokens
    with mask weights V·sg(π) (so the masked mean is the π-weighted sum)."""
    logp = jax.nn.log_softmax(theta)
    logq = jax.nn.log_softmax(phi)
    w = V * jax.lax.stop_gradient(jnp.exp(logp))
    return kl_loss(logp[None], logq[None], w[None], estimator=estimator)


def _exact_kl_loss(theta, phi):
    z = jnp.zeros((1, 1))
    return kl_loss(z, z, jnp.ones((1, 1)), estimator="exact", logits=theta[None, None],
                   ref_logits=phi[None, None])


@jax.jit
def _kl_gradients(theta, phi):
    """∇_θ of the closed-form reverse and forward KLs and of each estimator's expected loss, plus
    ∇_φ of every ``kl_loss`` (one compilation for the whole set)."""
    def reverse_kl(t):
        lp, lq = jax.nn.log_softmax(t), jax.nn.log_softmax(phi)
        return jnp.sum(jnp.exp(lp) * (lp - lq))

    def forward_kl(t):
        lp, lq = jax.nn.log_softmax(t), jax.nn.log_softmax(phi)
        return jnp.sum(jnp.exp(lq) * (lq - lp))

    out = {"reverse_kl": jax.grad(reverse_kl)(theta), "forward_kl": jax.grad(forward_kl)(theta),
           "exact": jax.grad(_exact_kl_loss)(theta, phi),
           "ref_exact": jax.grad(_exact_kl_loss, argnums=1)(theta, phi),
           "exact_value": _exact_kl_loss(theta, phi)}
    for e in ("k1", "k2", "k3"):
        out[e] = jax.grad(_estimator_expectation)(theta, phi, e)
        out["ref_" + e] = jax.grad(_estimator_expectation, argnums=1)(theta, phi, e)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_kl_estimators_exact_enumeration(seed):
    """Over y ~ π exactly: E[k1] = E[k3] = KL(π ‖ π_SFT); k3 ≥ 0 for every y (k1 is negative for
    some); the ``exact`` estimator equals Σ π log(π/π_SFT) at every position."""
    theta, phi = _categorical(seed)
    kl = _kl_np(theta, phi)
    lp, lq = ref.log_softmax(theta), ref.log_softmax(phi)
    p = np.exp(lp)
    per_y = {e: np.asarray(kl_per_token(*_f32(lp[None], lq[None]), estimator=e))[0]
             for e in ("k1", "k2", "k3")}
    np.testing.assert_allclose(per_y["k1"], lp - lq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_y["k2"], 0.5 * (lq - lp) ** 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_y["k3"], np.exp(lq - lp) - 1 - (lq - lp), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p @ per_y["k1"], kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p @ per_y["k3"], kl, rtol=1e-5, atol=1e-6)
    assert np.all(per_y["k3"] >= 0) and np.any(per_y["k1"] < 0)
    # k3 ≥ 0 also for extreme log-ratios (no cancellation going negative)
    extreme = jnp.array([[-30.0, -5.0, -1e-4, 0.0, 1e-4, 5.0, 30.0]])
    assert np.all(np.asarray(kl_per_token(jnp.zeros_like(extreme), extreme, estimator="k3")) >= 0)

    # exact estimator on [B', N', V] logits vs the float64 per-position sum
    rng = np.random.default_rng(seed)
    logits = 2 * rng.normal(size=(2, 3, V))
    ref_logits = 2 * rng.normal(size=(2, 3, V))
    got = kl_per_token(jnp.zeros((2, 3)), jnp.zeros((2, 3)), estimator="exact",
                       logits=jnp.asarray(logits, jnp.float32),
                       ref_logits=jnp.asarray(ref_logits, jnp.float32))
    want = np.array([[_kl_np(logits[i, j], ref_logits[i, j]) for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_kl_per_token_rejects_bad_arguments():
    """Unknown estimators and ``exact`` without logits are errors, not silent fallbacks."""
    z = jnp.zeros((1, 2))
    with pytest.raises(ValueError):
        kl_per_token(z, z, estimator="k4")
    with pytest.raises(ValueError):
        kl_per_token(z, z, estimator="exact")
    # a registered estimator without a reference test above is an omission (adding one is not)
    assert set(KL_ESTIMATORS) <= {"k1", "k2", "k3", "exact", "iw_k3"}   # iw_k3: test_zoo2.py


@pytest.mark.parametrize("seed", range(2))
def test_kl_estimator_gradients_as_losses(seed):
    """The expected gradient of each estimator used as a loss on on-policy samples:
    k2 -> ∇KL(π_θ ‖ π_SFT) (checked against autodiff of the closed form and a float64 central
    finite difference); k1 -> 0; k3 -> ∇KL(π_SFT ‖ π_θ), the *forward* KL; ``exact`` ->
    ∇KL(π_θ ‖ π_SFT). No gradient ever reaches the reference logits through ``kl_loss``."""
    theta, phi = _categorical(seed)
    g = jax.tree.map(np.asarray, _kl_gradients(*_f32(theta, phi)))
    h = 1e-5
    g_fd = np.array([(_kl_np(theta + h * e, phi) - _kl_np(theta - h * e, phi)) / (2 * h)
                     for e in np.eye(V)])
    np.testing.assert_allclose(g["reverse_kl"], g_fd, atol=1e-5)
    assert np.abs(g["reverse_kl"] - g["forward_kl"]).max() > 1e-2   # the directions differ here

    np.testing.assert_allclose(g["k2"], g["reverse_kl"], atol=1e-5)
    np.testing.assert_allclose(g["k2"], g_fd, atol=1e-5)
    np.testing.assert_allclose(g["k1"], np.zeros(V), atol=1e-6)
    np.testing.assert_allclose(g["k3"], g["forward_kl"], atol=1e-5)
    np.testing.assert_allclose(float(g["exact_value"]), _kl_np(theta, phi), rtol=1e-5)
    np.testing.assert_allclose(g["exact"], g["reverse_kl"], atol=1e-5)
    for e in ("k1", "k2", "k3", "exact"):                  # stop-gradient through the reference
        assert np.all(g["ref_" + e] == 0), e


@pytest.mark.parametrize("seed", range(2))
def test_kl_estimators_monte_carlo(seed):
    """The means of k1 and k3 over many samples y ~ π are within 4 standard errors of the exact
    KL(π ‖ π_SFT)."""
    theta, phi = _categorical(seed)
    kl = _kl_np(theta, phi)
    lp, lq = ref.log_softmax(theta), ref.log_softmax(phi)
    n = 200_000
    y = np.random.default_rng(seed).choice(V, size=n, p=np.exp(lp))
    logp, ref_logp = _f32(lp[y][None], lq[y][None])
    for e in ("k1", "k3"):
        k = np.asarray(kl_per_token(logp, ref_logp, estimator=e), np.float64)[0]
        se = k.std(ddof=1) / math.sqrt(n)
        assert abs(k.mean() - kl) < 4 * se, (e, k.mean(), kl, se)


def test_entropy_bonus_matches_numpy():
    """Token mean of the per-position entropy over counted tokens."""
    rng = np.random.default_rng(3)
    logits = 2 * rng.normal(size=(B, N, V))
    mask = _random_mask(rng)
    ent = entropy_from_logits(jnp.asarray(logits, jnp.float32))
    got = float(entropy_bonus(ent, jnp.asarray(mask)))
    np.testing.assert_allclose(got, ref.masked_mean(ref.entropy(logits), mask), rtol=1e-5)


# --------------------------------------------------------------------------- KL control
@pytest.mark.parametrize("kl", [0.0, 3.0, 5.4, 6.0, 6.6, 7.1, 60.0],
                         ids=["zero", "far_below", "below", "at", "above", "clip_edge", "far_above"])
def test_adaptive_kl_coef_matches_ziegler(kl):
    """β ← β·(1 + e·n/horizon), e = clip(KL/target − 1, −0.2, 0.2) (Ziegler et al. 2019), below,
    at and above the target, and clipped far from it."""
    beta, target, horizon, n_steps = 0.1, 6.0, 10_000.0, 512
    got = float(adaptive_kl_coef(jnp.float32(beta), jnp.float32(kl), target=target,
                                 horizon=horizon, n_steps=n_steps))
    want = _ziegler_coef(beta, kl, target, horizon, n_steps)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if kl == 6.0:
        assert got == pytest.approx(beta, rel=1e-7)
    elif kl in (0.0, 3.0):
        np.testing.assert_allclose(got, beta * (1 - 0.2 * n_steps / horizon), rtol=1e-6)
    elif kl == 60.0:
        np.testing.assert_allclose(got, beta * (1 + 0.2 * n_steps / horizon), rtol=1e-6)
    else:
        assert (got > beta) == (kl > target)


def test_adaptive_kl_coef_iterated():
    """Fifty jitted controller steps (KL and ``n_steps`` traced) on a stream of KLs equal the
    Python recursion."""
    rng = np.random.default_rng(0)
    kls = rng.uniform(0.0, 20.0, size=50)
    ns = rng.integers(16, 128, size=50)
    step = jax.jit(lambda b, k, n: adaptive_kl_coef(b, k, target=6.0, horizon=1000.0, n_steps=n))
    beta, want = jnp.float32(0.2), 0.2
    for k, n in zip(kls, ns):
        beta = step(beta, jnp.float32(k), jnp.int32(n))
        want = _ziegler_coef(want, float(k), 6.0, 1000.0, int(n))
    np.testing.assert_allclose(float(beta), want, rtol=1e-5)


# --------------------------------------------------------------------------- running moments
@pytest.mark.parametrize("seed", range(2))
@JIT
def test_running_moments_match_numpy_concatenation(seed, jit):
    """Count, mean and std (ddof=1) after several masked batches of different shapes (one fully
    masked, one with ``mask=None``) equal NumPy's over the concatenation of counted values."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (2, 7), (3, 4), (2, 7), (3, 4)]
    update = _maybe_jit(RunningMoments.update, jit)
    state, seen = RunningMoments.create(), []
    for i, shape in enumerate(shapes):
        x = (4.0 + 3.0 * rng.normal(size=shape)).astype(np.float32)
        if i == 2:
            mask = np.zeros(shape, np.float32)           # nothing counted: a no-op
        else:
            mask = (rng.random(shape) < 0.6).astype(np.float32)
            mask.flat[0] = 1
        if i == 4:
            state = state.update(jnp.asarray(x))       # mask=None counts everything
            seen.append(x.ravel())
        else:
            x = _garbage_on_padding(rng, x, mask)
            state = update(state, jnp.asarray(x), jnp.asarray(mask))
            seen.append(x[mask.astype(bool)])
        allv = np.concatenate(seen).astype(np.float64)
        assert float(state.count) == allv.size
        np.testing.assert_allclose(float(state.mean), allv.mean(), rtol=1e-5)
        if allv.size > 1:
            np.testing.assert_allclose(float(state.std), allv.std(ddof=1), rtol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "iw_k3"])
def test_kl_loss_ignores_masked_positions_even_where_the_policy_gives_them_no_mass(estimator):
    """Masked (post-EOS) positions leave ``kl_loss``'s value and gradient untouched whatever the
    policy's log-prob there. The iteration passes the rollout's reference (and old) log-probs
    zeroed on padding but the fresh policy log-probs unmasked: a pad token the policy finds
    unlikely (tempered log π < −88.7) made k3 = e^{−log π} − 1 + log π overflow to inf, and
    inf·0 = NaN in the masked sum, so the loss and its gradient were NaN and every update was
    skipped (``train/finite`` 0)."""
    mask = jnp.asarray([[1.0, 1.0, 0.0, 0.0]])
    ref_logp = jnp.asarray([[-0.7, -1.2, 0.0, 0.0]])     # zero on padding, as the rollout's
    old_logp = jnp.asarray([[-0.9, -1.0, 0.0, 0.0]])

    def f(logp):
        return kl_loss(logp, ref_logp, mask, estimator=estimator, old_logp=old_logp)

    base = jnp.asarray([[-0.8, -1.1, -3.0, -2.0]])
    far = base.at[0, 2:].set(jnp.asarray([-100.0, -150.0]))
    v0, g0 = jax.value_and_grad(f)(base)
    v1, g1 = jax.value_and_grad(f)(far)
    assert np.isfinite(float(v1)) and np.all(np.isfinite(np.asarray(g1))), (v1, g1)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(g1)[0, 2:], 0.0)
