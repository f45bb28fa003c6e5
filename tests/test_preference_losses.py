"""DPO / IPO / SimPO against NumPy loop references, K-wise pairing, and a one-step bandit whose
population optimum is known in closed form (DPO) or by least squares (IPO)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.data.preference_records import ranked_pairs
from rlhf_jax.losses.preference import (PREFERENCE_LOSSES, REFERENCE_FREE, dpo_loss, ipo_loss,
                                        kwise_pairs, kwise_preference_loss, simpo_loss)


def _log_sigmoid(x: float) -> float:
    return -np.logaddexp(0.0, -x)


def _weighted_mean(losses, w):
    return sum(wi * li for wi, li in zip(w, losses)) / sum(w)


def dpo_reference(pc, pr, rc, rr, beta, eps, w):
    losses = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = (a - c) - (b - d)
        losses.append(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
    return _weighted_mean(losses, w)


def ipo_reference(pc, pr, rc, rr, tau, lc, lr, average, w):
    losses = []
    for a, b, c, d, n, m in zip(pc, pr, rc, rr, lc, lr):
        x, y = a - c, b - d
        if average:
            x, y = x / n, y / m
        losses.append((x - y - 1 / (2 * tau)) ** 2)
    return _weighted_mean(losses, w)


def simpo_reference(pc, pr, lc, lr, beta, gamma, w):
    return _weighted_mean([-_log_sigmoid(beta * a / n - beta * b / m - gamma)
                           for a, b, n, m in zip(pc, pr, lc, lr)], w)


def _random_pairs(seed, b=12):
    rng = np.random.default_rng(seed)
    logps = [rng.normal(-8, 3, b).astype(np.float32) for _ in range(4)]
    lens = [rng.integers(1, 13, b).astype(np.float32) for _ in range(2)]
    w = rng.uniform(0.1, 1.0, b).astype(np.float32)
    return logps, lens, w


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_matches_reference(seed, eps):
    (pc, pr, rc, rr), _, w = _random_pairs(seed)
    loss, m = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=0.3, label_smoothing=eps,
                       mask=jnp.asarray(w))
    np.testing.assert_allclose(float(loss), dpo_reference(pc, pr, rc, rr, 0.3, eps, w), rtol=1e-5)
    h = (pc - rc) - (pr - rr)
    np.testing.assert_allclose(float(m["accuracy"]), np.sum(w * (h > 0)) / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(m["margin"]), np.sum(w * 0.3 * h) / w.sum(), rtol=1e-4)
    np.testing.assert_allclose(float(m["chosen_reward"]), np.sum(w * 0.3 * (pc - rc)) / w.sum(),
                               rtol=1e-4)


def test_dpo_without_smoothing_or_weights_is_plain_mean():
    (pc, pr, rc, rr), _, _ = _random_pairs(3)
    args = tuple(map(jnp.asarray, (pc, pr, rc, rr)))
    plain = -np.mean([_log_sigmoid(0.5 * ((a - c) - (b - d))) for a, b, c, d in zip(pc, pr, rc, rr)])
    loss, _ = dpo_loss(*args, beta=0.5)
    np.testing.assert_allclose(float(loss), plain, rtol=1e-5)
    loss0, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.0, mask=jnp.ones(len(pc)))
    np.testing.assert_allclose(float(loss0), plain, rtol=1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_ipo_matches_reference(average):
    (pc, pr, rc, rr), (lc, lr), w = _random_pairs(4)
    loss, m = ipo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), tau=0.1, chosen_len=jnp.asarray(lc),
                       rejected_len=jnp.asarray(lr), average_length=average,
                       mask=jnp.asarray(w))
    np.testing.assert_allclose(float(loss), ipo_reference(pc, pr, rc, rr, 0.1, lc, lr, average, w),
                               rtol=1e-5)
    assert 0.0 <= float(m["accuracy"]) <= 1.0
    with pytest.raises(ValueError, match="chosen_len"):
        ipo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), tau=0.1, average_length=True)


def test_simpo_matches_reference():
    (pc, pr, _, _), (lc, lr), w = _random_pairs(5)
    loss, m = simpo_loss(*map(jnp.asarray, (pc, pr, lc, lr)), beta=2.0, simpo_margin=1.0,
                         mask=jnp.asarray(w))
    np.testing.assert_allclose(float(loss), simpo_reference(pc, pr, lc, lr, 2.0, 1.0, w),
                               rtol=1e-5)
    np.testing.assert_allclose(float(m["margin"]),
                               np.sum(w * (2 * pc / lc - 2 * pr / lr)) / w.sum(), rtol=1e-4)


def orpo_reference(pc, pr, lc, lr, lam, w):
    """ORPO per pair, a loop: −ℓ_w + λ·log(1 + exp(−(log odds_w − log odds_l))), ℓ = log π/|y|
    capped at −1e-6, log odds = ℓ − log(1 − e^ℓ)."""
    num = 0.0
    for a, b, la, lb, wi in zip(pc, pr, lc, lr, w):
        ca, cb = min(a / max(la, 1), -1e-6), min(b / max(lb, 1), -1e-6)
        odds = (ca - np.log(-np.expm1(ca))) - (cb - np.log(-np.expm1(cb)))
        num += wi * (-ca + lam * np.log1p(np.exp(-odds)))
    return num / sum(w)


def test_registry():
    """Every registered loss has a NumPy reference below (a new loss fails here only if it has
    none); the reference-free ones are registered."""
    assert set(PREFERENCE_LOSSES) <= set(HPARAMS), sorted(set(PREFERENCE_LOSSES) - set(HPARAMS))
    assert {"dpo", "ipo", "simpo"} <= set(PREFERENCE_LOSSES)
    assert REFERENCE_FREE <= set(PREFERENCE_LOSSES) and "simpo" in REFERENCE_FREE


# ------------------------------------------------------------------------------- K-wise pairs

def test_kwise_pairs_match_ranked_pairs_and_drop_ties():
    ranking = np.asarray([[3.0, 1.0, 2.0, 0.0],
                          [1.0, 1.0, 0.0, 0.0],     # two ties
                          [2.0, 2.0, 2.0, 2.0]],    # all tied: no pair
                         np.float32)
    winner, loser, weight = map(np.asarray, kwise_pairs(jnp.asarray(ranking)))
    for p in range(len(ranking)):
        kept = sorted((int(a), int(b)) for a, b, w in zip(winner[p], loser[p], weight[p]) if w > 0)
        assert kept == sorted(ranked_pairs(ranking[p]))
        if kept:
            np.testing.assert_allclose(weight[p][weight[p] > 0], 1.0 / len(kept))
    np.testing.assert_allclose(weight.sum(-1), [1.0, 1.0, 0.0])
    # absent responses drop out like ties
    _, _, wv = map(np.asarray, kwise_pairs(jnp.asarray(ranking[:1]),
                                           mask=jnp.asarray([[1, 1, 1, 0]])))
    np.testing.assert_allclose(wv.sum(), 1.0)
    assert (wv > 0).sum() == 3


def kwise_reference(name, logps, ref, lens, ranking, hp):
    """Per prompt: mean over its untied ordered pairs; then mean over prompts with a pair."""
    per_prompt = []
    for p in range(len(ranking)):
        pairs = ranked_pairs(ranking[p])
        if not pairs:
            continue
        pc = [logps[p, i] for i, _ in pairs]
        pr = [logps[p, j] for _, j in pairs]
        rc = [ref[p, i] for i, _ in pairs]
        rr = [ref[p, j] for _, j in pairs]
        lc = [lens[p, i] for i, _ in pairs]
        lr = [lens[p, j] for _, j in pairs]
        ones = [1.0] * len(pairs)
        per_prompt.append({
            "dpo": lambda: dpo_reference(pc, pr, rc, rr, hp["beta"], 0.0, ones),
            "ipo": lambda: ipo_reference(pc, pr, rc, rr, hp["tau"], lc, lr, False, ones),
            "simpo": lambda: simpo_reference(pc, pr, lc, lr, hp["beta"], hp["simpo_margin"], ones),
            "orpo": lambda: orpo_reference(pc, pr, lc, lr, hp["orpo_lambda"], ones),
        }[name]())
    return np.mean(per_prompt)


HPARAMS = {"dpo": {"beta": 0.2}, "ipo": {"tau": 0.3}, "simpo": {"beta": 2.0, "simpo_margin": 0.5},
           "orpo": {"orpo_lambda": 0.3}}


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_kwise_loss_matches_reference_and_is_order_invariant(name):
    rng = np.random.default_rng(7)
    p, k = 5, 4
    logps = rng.normal(-6, 2, (p, k)).astype(np.float32)
    ref = rng.normal(-6, 2, (p, k)).astype(np.float32)
    lens = rng.integers(1, 10, (p, k)).astype(np.float32)
    ranking = rng.integers(0, 3, (p, k)).astype(np.float32)   # ties on purpose
    ranking[0] = [0, 0, 0, 0]                                   # a prompt with no pair
    hp = HPARAMS[name]
    loss, m = kwise_preference_loss(name, *map(jnp.asarray, (logps, ref, lens, ranking)), **hp)
    np.testing.assert_allclose(float(loss), kwise_reference(name, logps, ref, lens, ranking, hp),
                               rtol=1e-5)
    assert int(m["pairs"]) == sum(len(ranked_pairs(r)) for r in ranking)
    perm = rng.permutation(k)
    loss_p, _ = kwise_preference_loss(name, *(jnp.asarray(a[:, perm])
                                              for a in (logps, ref, lens, ranking)), **hp)
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_k2_equals_plain_pair(name):
    rng = np.random.default_rng(8)
    logps = rng.normal(-5, 2, (6, 2)).astype(np.float32)
    ref = rng.normal(-5, 2, (6, 2)).astype(np.float32)
    lens = rng.integers(1, 10, (6, 2)).astype(np.float32)
    ranking = np.tile(np.asarray([[0.0, 1.0]], np.float32), (6, 1))   # response 1 preferred
    hp = HPARAMS[name]
    loss, _ = kwise_preference_loss(name, *map(jnp.asarray, (logps, ref, lens, ranking)), **hp)
    if name in REFERENCE_FREE:
        plain, _ = PREFERENCE_LOSSES[name](logps[:, 1], logps[:, 0], lens[:, 1], lens[:, 0], **hp)
    else:
        plain, _ = PREFERENCE_LOSSES[name](logps[:, 1], logps[:, 0], ref[:, 1], ref[:, 0], **hp)
    np.testing.assert_allclose(float(loss), float(plain), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_gradients_finite_and_descend(name):
    rng = np.random.default_rng(9)
    logps = jnp.asarray(rng.normal(-5, 2, (4, 3)), jnp.float32)
    ref = jnp.asarray(rng.normal(-5, 2, (4, 3)), jnp.float32)
    lens = jnp.asarray(rng.integers(1, 10, (4, 3)), jnp.float32)
    ranking = jnp.asarray(rng.integers(0, 3, (4, 3)), jnp.float32)
    f = lambda x: kwise_preference_loss(name, x, ref, lens, ranking, **HPARAMS[name])[0]  # noqa
    g = jax.grad(f)(logps)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0
    assert float(f(logps - 1e-3 * g)) < float(f(logps))


# ---------------------------------------------------------------------------- one-step bandit

V = 4
R = np.asarray([2.0, 0.0, -1.5, 0.5])               # Bradley–Terry rewards
REF_LOGITS = np.asarray([0.3, 1.0, -0.2, -0.8])


def _bandit():
    """All ordered pairs (i ≻ j) of a one-token bandit with weights μ_ij·p_ij: the pair {i, j}
    drawn as two samples of π_ref (μ_ij = π_ref(i)π_ref(j)), labelled i ≻ j with the
    Bradley–Terry probability p_ij = σ(r_i − r_j)."""
    pi_ref = np.exp(REF_LOGITS - np.logaddexp.reduce(REF_LOGITS))
    pairs = [(i, j) for i, j in itertools.permutations(range(V), 2)]
    p = np.asarray([1 / (1 + np.exp(-(R[i] - R[j]))) for i, j in pairs])
    mu = np.asarray([pi_ref[i] * pi_ref[j] for i, j in pairs])
    return pi_ref, np.asarray(pairs), p, mu


def _optimise(loss_of_logp, steps=3000, lr=0.05):
    """Adam on the policy's logits (one token per response), from the reference logits."""
    tx = optax.adam(lr)

    def step(carry, _):
        theta, opt = carry
        g = jax.grad(lambda t: loss_of_logp(jax.nn.log_softmax(t)))(theta)
        upd, opt = tx.update(g, opt)
        return (optax.apply_updates(theta, upd), opt), None

    theta = jnp.asarray(REF_LOGITS, jnp.float32)
    (theta, _), _ = jax.lax.scan(step, (theta, tx.init(theta)), None, length=steps)
    return np.asarray(jax.nn.softmax(theta), np.float64)


def test_dpo_bandit_reaches_kl_regularised_optimum():
    beta = 0.5
    pi_ref, pairs, p, mu = _bandit()
    ref_lp = jnp.asarray(np.log(pi_ref), jnp.float32)
    w, c, r = jnp.asarray(mu * p, jnp.float32), jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])

    def loss(logp):
        return dpo_loss(logp[c], logp[r], ref_lp[c], ref_lp[r], beta=beta, mask=w)[0]

    pi = _optimise(loss)
    target = pi_ref * np.exp(R / beta)
    target /= target.sum()
    assert 0.5 * np.abs(pi - target).sum() < 5e-3, (pi.round(4), target.round(4))
    assert 0.5 * np.abs(pi_ref - target).sum() > 0.2   # not passed by standing still


def test_ipo_bandit_reaches_least_squares_optimum():
    """Expected IPO loss of the unordered pair {i, j}: μ_ij[p_ij(d − c)² + p_ji(−d − c)²] with
    d = u_i − u_j, u = log π/π_ref, c = 1/(2τ); = μ_ij(d − (2p_ij − 1)c)² + const. So the optimum
    solves the weighted least-squares system √μ_ij (u_i − u_j) = √μ_ij (p_ij − 1/2)/τ."""
    tau = 0.5
    pi_ref, pairs, p, mu = _bandit()
    rows, targets = [], []
    for (i, j), pij, m in zip(pairs, p, mu):
        if i < j:
            e = np.zeros(V)
            e[i], e[j] = 1.0, -1.0
            rows.append(np.sqrt(m) * e)
            targets.append(np.sqrt(m) * (pij - 0.5) / tau)
    u, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(targets), rcond=None)
    target = pi_ref * np.exp(u)
    target /= target.sum()

    ref_lp = jnp.asarray(np.log(pi_ref), jnp.float32)
    w, c, r = jnp.asarray(mu * p, jnp.float32), jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])

    def loss(logp):
        return ipo_loss(logp[c], logp[r], ref_lp[c], ref_lp[r], tau=tau, mask=w)[0]

    pi = _optimise(loss)
    got_u = np.log(pi) - np.log(pi_ref)
    np.testing.assert_allclose(got_u - got_u[0], u - u[0], atol=2e-3)
    assert 0.5 * np.abs(pi_ref - target).sum() > 0.1


def test_a_registered_reference_free_loss_gets_the_lengths_and_no_reference():
    """A new reference-free loss, registered in ``PREFERENCE_LOSSES`` and ``REFERENCE_FREE``,
    is called with the lengths in place of the reference log-probs (length-normalised margin)."""
    from rlhf_jax.losses.preference import preference_loss

    def per_token_margin(pc, pr, lc, lr, *, mask=None, axis_name=None):
        return jnp.mean(pc / lc - pr / lr), {}

    PREFERENCE_LOSSES["per_token_margin"] = per_token_margin
    REFERENCE_FREE.add("per_token_margin")
    try:
        loss, _ = preference_loss("per_token_margin", policy_chosen=jnp.array([-4.0, -6.0]),
                                  policy_rejected=jnp.array([-9.0, -3.0]),
                                  chosen_len=jnp.array([2.0, 3.0]),
                                  rejected_len=jnp.array([3.0, 1.0]))
        np.testing.assert_allclose(float(loss), ((-2.0 + 3.0) + (-2.0 + 3.0)) / 2)
    finally:
        PREFERENCE_LOSSES.pop("per_token_margin")
        REFERENCE_FREE.discard("per_token_margin")
