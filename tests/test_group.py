"""GRPO, Dr. GRPO, RLOO, RAFT's best and online DPO's pair: group advantages, loss aggregations
and REINFORCE against NumPy loops, and the whole compiled iteration on a one-step bandit against
its (exactly computed) optimum."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ppo import _masked_mean, _setup, _state, kl_regularised_optimum, run_bandit, tv

from rlhf_jax.configs import ConfigError
from rlhf_jax.losses.policy_gradient import reinforce_loss
from rlhf_jax.losses.ppo import clipped_policy_loss, kl_loss
from rlhf_jax.ops import AGGREGATIONS, aggregate
from rlhf_jax.rl.advantages import ADVANTAGES, token_rewards
from rlhf_jax.rl.group import GRPO_EPS, best_rows
from rlhf_jax.rl.ppo import POLICY_LOSSES, PPOHParams, make_iteration
from rlhf_jax.rl.presets import PRESETS, dr_grpo_hparams, grpo_hparams, raft_hparams, rloo_hparams
from rlhf_jax.sampling import SamplingConfig, response_logits, sample
from rlhf_jax.ops import token_logprobs
from rlhf_jax.train import OptimConfig
from rlhf_jax.stages.online import METHODS, online_config

G, PROMPTS, N = 4, 3, 7
B = G * PROMPTS


def _padded_batch(seed):
    """Right-padded rows of random lengths (one length 1, one full), junk on padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, N + 1, size=B)
    lengths[0], lengths[1] = 1, N
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
    rewards = np.where(mask, rng.normal(size=(B, N)), 1e3 * rng.normal(size=(B, N)))
    values = np.where(mask, 0.0, 1e3 * rng.normal(size=(B, N)))   # no critic: 0 where counted
    return rewards.astype(np.float32), values.astype(np.float32), mask, lengths


def _group_advantage_loops(rewards, mask, kind):
    """Per-sequence advantages by explicit loops over groups and members (float64)."""
    seq = [float(sum(rewards[b, t] for t in range(N) if mask[b, t])) for b in range(B)]
    out = np.zeros((B, N))
    for g in range(PROMPTS):
        members = [seq[g * G + i] for i in range(G)]
        mean = sum(members) / G
        std = (sum((x - mean) ** 2 for x in members) / (G - 1)) ** 0.5
        for i in range(G):
            if kind == "grpo":
                a = (members[i] - mean) / (std + GRPO_EPS)
            elif kind == "dr_grpo":
                a = members[i] - mean
            elif kind == "rloo":
                a = members[i] - sum(members[j] for j in range(G) if j != i) / (G - 1)
            elif kind == "best":   # 1 on the first of the largest
                a = float(i == max(range(G), key=lambda j: (members[j], -j)))
            else:   # pair: +1 on the first of the largest, −1 on the first of the smallest
                hi = max(range(G), key=lambda j: (members[j], -j))
                lo = min(range(G), key=lambda j: (members[j], j))
                a = 0.0 if members[hi] == members[lo] else float(i == hi) - float(i == lo)
            for t in range(N):
                if mask[g * G + i, t]:
                    out[g * G + i, t] = a
    return out


# each checked against its loop reference here
GROUP_KINDS = ("grpo", "dr_grpo", "rloo", "best", "pair")
# each checked against its loops below (GSPO's two in test_zoo2.py)
TESTED_POLICY_LOSSES = ("clipped", "reinforce", "gspo", "gspo_token")


def test_every_registered_estimator_and_loss_has_a_reference_test():
    """Registries may grow: this fails only when a registered advantage estimator or policy loss
    has no reference test (GAE's is in test_ppo_math.py), not because one was added with its
    test."""
    assert set(ADVANTAGES) <= {"gae", *GROUP_KINDS}, set(ADVANTAGES) - {"gae", *GROUP_KINDS}
    assert set(POLICY_LOSSES) <= set(TESTED_POLICY_LOSSES)


@pytest.mark.parametrize("kind", GROUP_KINDS)
@pytest.mark.parametrize("seed", range(2))
def test_group_advantages_match_loops(kind, seed):
    """Each estimator equals its loop reference, is the same on every counted token of a
    response and 0 on padding (whose junk rewards never leak in); returns = advantages (V = 0)."""
    rewards, values, mask, _ = _padded_batch(seed)
    fn = jax.jit(lambda r, v, m: ADVANTAGES[kind](r, v, m, discount=0.9, gae_lambda=0.5,
                                                  group_size=G))
    adv, ret = (np.asarray(x) for x in fn(jnp.asarray(rewards), jnp.asarray(values),
                                          jnp.asarray(mask)))
    want = _group_advantage_loops(rewards, mask, kind)
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want, rtol=1e-5, atol=1e-5)
    assert np.all(adv[mask == 0] == 0)
    per_seq = want.sum(1) / mask.sum(1)
    if kind in ("dr_grpo", "rloo"):   # baselines: their group sums are 0
        np.testing.assert_allclose(per_seq.reshape(PROMPTS, G).sum(1), 0, atol=1e-5)


def test_group_advantage_identities_and_hand_worked():
    """One group, scores (1, 2, 3, 6) on one-token responses: mean 3, unbiased std √(14/3);
    Dr. GRPO (−2, −1, 0, 3), RLOO (−8/3, −4/3, 0, 4) = G/(G−1)·Dr. GRPO; GRPO = Dr. GRPO / std.
    RLOO's sequence reward includes the reward-side KL: R = score − β·Σ_t k1."""
    scores = jnp.array([1.0, 2.0, 3.0, 6.0])
    mask = jnp.ones((4, 1))
    rewards = token_rewards(scores, jnp.zeros((4, 1)), mask, kl_coef=0.0)
    kw = dict(discount=1.0, gae_lambda=1.0, group_size=4)
    dr = np.asarray(ADVANTAGES["dr_grpo"](rewards, jnp.zeros((4, 1)), mask, **kw)[0])[:, 0]
    lo = np.asarray(ADVANTAGES["rloo"](rewards, jnp.zeros((4, 1)), mask, **kw)[0])[:, 0]
    gr = np.asarray(ADVANTAGES["grpo"](rewards, jnp.zeros((4, 1)), mask, **kw)[0])[:, 0]
    np.testing.assert_allclose(dr, [-2, -1, 0, 3], rtol=1e-6)
    np.testing.assert_allclose(lo, [-8 / 3, -4 / 3, 0, 4], rtol=1e-6)
    np.testing.assert_allclose(gr, dr / (np.sqrt(14 / 3) + GRPO_EPS), rtol=1e-5)
    # KL on the reward side: two tokens each, k1 = (0.5, 0.5) on row 0 only, β = 2
    kl = jnp.zeros((4, 2)).at[0].set(0.5)
    rew = token_rewards(scores, kl, jnp.ones((4, 2)), kl_coef=2.0)
    lo_kl = np.asarray(ADVANTAGES["rloo"](rew, jnp.zeros((4, 2)), jnp.ones((4, 2)), **kw)[0])
    r = np.array([1.0 - 2.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(lo_kl[:, 0], [r[i] - (r.sum() - r[i]) / 3 for i in range(4)],
                               rtol=1e-6)
    # best: the 6, unless β·Σk1 on the reward side outweighs its lead; ties go to the first
    def best(r):
        zeros, ones = jnp.zeros(r.shape), jnp.ones(r.shape)
        return np.asarray(ADVANTAGES["best"](r, zeros, ones, **kw)[0])[:, 0]

    np.testing.assert_array_equal(best(rewards), [0, 0, 0, 1])
    kl6 = jnp.zeros((4, 2)).at[3].set(1.0)   # Σk1 = 2 on the 6: R = 6 − 2β
    np.testing.assert_array_equal(best(token_rewards(scores, kl6, jnp.ones((4, 2)), kl_coef=1.0)),
                                  [0, 0, 0, 1])   # 4 > 3
    np.testing.assert_array_equal(best(token_rewards(scores, kl6, jnp.ones((4, 2)), kl_coef=2.0)),
                                  [0, 0, 1, 0])   # 2 < 3
    tie = token_rewards(jnp.array([5.0, 6.0, 1.0, 6.0]), jnp.zeros((4, 1)), mask, kl_coef=0.0)
    np.testing.assert_array_equal(best(tie), [0, 1, 0, 0])
    # a group of identical rewards has zero advantage under every estimator (no NaN from std 0)
    same = token_rewards(jnp.full((4,), 0.7), jnp.zeros((4, 1)), mask, kl_coef=0.0)
    for kind in ("grpo", "dr_grpo", "rloo"):
        a = np.asarray(ADVANTAGES[kind](same, jnp.zeros((4, 1)), mask, **kw)[0])
        np.testing.assert_allclose(a, 0.0, atol=1e-6)


def test_groups_are_consecutive_rows_and_local():
    """Groups are blocks of G consecutive rows: computing the two halves of the batch apart (as
    two devices would) gives the same advantages as the whole batch."""
    rewards, values, mask, _ = _padded_batch(3)
    for kind in ("grpo", "rloo"):
        fn = lambda r, v, m: ADVANTAGES[kind](r, v, m, discount=1.0, gae_lambda=1.0,  # noqa: E731
                                              group_size=G)[0]
        whole = np.asarray(fn(*map(jnp.asarray, (rewards, values, mask))))
        h = B // 2 // G * G
        parts = [np.asarray(fn(*map(jnp.asarray, (rewards[s], values[s], mask[s]))))
                 for s in (slice(0, h), slice(h, B))]
        np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-6)


def test_best_rows_are_each_groups_winner_and_local():
    """``best_rows`` keeps the row :func:`best_of_group` marks in each group, with its global
    group id; two halves of the batch (two devices) give the whole batch's rows and ids."""
    rewards, values, mask, _ = _padded_batch(4)
    seq = jnp.asarray((rewards * mask).sum(1))
    data = {"x": jnp.arange(B * 3).reshape(B, 3), "mask": jnp.asarray(mask)}
    ids = jnp.arange(B)
    out, gid = best_rows(data, seq, ids, group_size=G)
    adv = np.asarray(ADVANTAGES["best"](jnp.asarray(rewards), jnp.asarray(values),
                                        jnp.asarray(mask), discount=1.0, gae_lambda=1.0,
                                        group_size=G)[0]).max(1)
    np.testing.assert_array_equal(np.asarray(out["x"])[:, 0] // 3, np.flatnonzero(adv))
    np.testing.assert_array_equal(gid, np.arange(PROMPTS))
    h = 2 * G   # the first two groups on one device, the third on another
    parts = [best_rows(jax.tree.map(lambda x: x[s], data), seq[s], ids[s], group_size=G)
             for s in (slice(0, h), slice(h, B))]
    np.testing.assert_array_equal(np.concatenate([np.asarray(p[0]["x"]) for p in parts]),
                                  out["x"])
    np.testing.assert_array_equal(np.concatenate([np.asarray(p[1]) for p in parts]), gid)


def run_group_iteration(hp: PPOHParams, updates: int):
    """One compiled iteration of ``hp`` (8 prompts × G = 4, 6 new tokens, no critic, Adam at
    1e-2 scheduled over ``updates``) from fresh test models; its rollout checked against the
    sampler's own draws from the policy or the reference (``hp.sample_from``). Returns the
    models, the policy's state before, the frozen parameters, the state after, the metrics, the
    rollout and the rollout's prompt rows and their mask."""
    models, p_params, ref_params, rm_params, _, prompts, pmask = _setup()
    models = dataclasses.replace(models, value=None)
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
    state, frozen = _state(models, p_params, None, ref_params, rm_params, hp, optim, updates)
    pol = state.policy
    it = jax.jit(make_iteration(models, hp, max_new_tokens=6, eos_id=2, pad_id=0))
    got, metrics, ro = it(state, frozen, {"prompts": prompts, "prompt_mask": pmask,
                                          "example_ids": jnp.arange(32)}, jax.random.key(7))
    rows_p, rows_m = jnp.repeat(prompts, 4, axis=0), jnp.repeat(pmask, 4, axis=0)
    sampler = {"policy": p_params, "reference": ref_params}[hp.sample_from]
    drawn = jax.jit(lambda p: sample(models.policy, p, rows_p, rows_m,
                                     jax.random.split(jax.random.key(7))[0],
                                     cfg=SamplingConfig(max_new_tokens=6), eos_id=2, pad_id=0,
                                     example_ids=jnp.arange(32)).tokens)(sampler)
    np.testing.assert_array_equal(ro["responses"], drawn)
    return models, pol, frozen, got, metrics, ro, rows_p, rows_m


@pytest.mark.parametrize("sample_from", ["policy", "reference"])
def test_raft_iteration_is_sft_on_each_prompts_best_sample(sample_from):
    """RAFT's compiled iteration (G = 4, ranking by score − β·Σk1, 2 epochs of one minibatch)
    equals a written-out reference on the rollout it returns: the log-probs of policy and
    reference by a forward pass, each group's winner picked by a loop, then two optimiser steps on
    the mean negative log-likelihood of the winners' response tokens. With ``sample_from=
    "reference"`` the rollout is the reference's own samples (best-of-G distillation)."""
    hp = raft_hparams(prompts_per_iter=8, group_size=4, epochs=2, minibatches=1, kl_coef=0.3,
                      no_eos_penalty=0.0, sample_from=sample_from)
    models, pol, frozen, got, metrics, ro, rows_p, rows_m = run_group_iteration(hp, 4)

    def logp(params, rows):
        logits, _ = response_logits(models.policy, params, rows_p[rows], rows_m[rows],
                                    ro["responses"][rows], ro["mask"][rows])
        return token_logprobs(logits, ro["responses"][rows])

    m = np.asarray(ro["mask"], np.float64)
    every = jnp.arange(32)
    k1 = np.asarray(logp(pol.params, every), np.float64) - np.asarray(
        logp(frozen.ref, every), np.float64)
    r = np.asarray(ro["rm_score"], np.float64) - 0.3 * (k1 * m).sum(1)
    win = np.array([4 * g + int(np.argmax(r[4 * g:4 * g + 4])) for g in range(8)])
    assert len(set(win % 4)) > 1   # the winners are not all the first sample
    nll = lambda params, rows: -_masked_mean(logp(params, rows), ro["mask"][rows])  # noqa: E731
    step = jax.jit(lambda s, rows: s.apply_gradients(jax.grad(nll)(s.params, rows)))
    want = step(step(pol, win), win)
    # Adam's steps are ~1e-2 per parameter; 1e-4 absorbs its amplified rounding on gradients ~0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                 got.policy.params, want.params)
    # SFT on the first sample of each group instead lands elsewhere: the test can fail
    first = win - win % 4
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3 for a, b in zip(
        jax.tree.leaves(got.policy.params), jax.tree.leaves(step(step(pol, first), first).params)))
    assert float(metrics["train/policy_loss"]) > 0   # the NLL of the winners


# --------------------------------------------------------------------------- aggregations
def _aggregate_loops(x, mask, how):
    x, mask = np.asarray(x, np.float64), np.asarray(mask)
    if how == "token":
        return sum(x[b, t] for b in range(len(x)) for t in range(N) if mask[b, t]) / mask.sum()
    if how == "sequence":
        means = [sum(x[b, t] for t in range(N) if mask[b, t]) / mask[b].sum()
                 for b in range(len(x)) if mask[b].sum() > 0]
        return sum(means) / len(means)
    total = sum(x[b, t] for b in range(len(x)) for t in range(N) if mask[b, t])
    return total / (sum(mask[b].sum() > 0 for b in range(len(x))) * N)


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_aggregations_match_loops_and_are_global_under_sharding(how):
    """token / sequence / budget means equal the loop definitions (an empty row, e.g. a
    zero-weight filler of dynamic sampling, is not a sequence for ``sequence`` nor in
    ``budget``'s B'·N) and, split over two shards
    with very different token counts, reduce to the whole-batch value."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(B, N)).astype(np.float32)
    _, _, mask, _ = _padded_batch(5)
    mask = mask.copy()
    mask[3] = 0
    got = float(aggregate(jnp.asarray(x), jnp.asarray(mask), aggregation=how))
    np.testing.assert_allclose(got, _aggregate_loops(x, mask, how), rtol=1e-5)
    split = jax.vmap(lambda a, m: aggregate(a, m, aggregation=how, axis_name="d"),
                     axis_name="d")(jnp.asarray(x).reshape(2, B // 2, N),
                                    jnp.asarray(mask).reshape(2, B // 2, N))
    np.testing.assert_allclose(np.asarray(split), got, rtol=1e-5)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(jnp.asarray(x), jnp.asarray(mask), aggregation="mean")


def _ppo_inputs(seed):
    rng = np.random.default_rng(seed)
    _, _, mask, _ = _padded_batch(seed)
    old = (-1.0 - rng.exponential(size=(B, N))).astype(np.float32)
    logp = (old + 0.4 * rng.normal(size=(B, N))).astype(np.float32)
    adv = rng.normal(size=(B, N)).astype(np.float32)
    return logp, old, adv, mask


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_clipped_loss_aggregations(how):
    """The clipped surrogate reduced per aggregation equals the loop reference on the per-token
    max(−Aρ, −A·clip ρ); ``token`` is the default; metrics are token means whatever the
    aggregation."""
    logp, old, adv, mask = _ppo_inputs(0)
    r = np.exp(logp.astype(np.float64) - old)
    per_tok = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.2))
    loss, m = clipped_policy_loss(*map(jnp.asarray, (logp, old, adv, mask)), clip_eps=0.2,
                                  aggregation=how)
    np.testing.assert_allclose(float(loss), _aggregate_loops(per_tok, mask, how), rtol=1e-5)
    base, bm = clipped_policy_loss(*map(jnp.asarray, (logp, old, adv, mask)), clip_eps=0.2)
    for k in ("clip_frac", "approx_kl", "ratio"):
        assert float(m[k]) == float(bm[k])
    if how == "token":
        assert float(loss) == float(base)
    assert POLICY_LOSSES["clipped"] is clipped_policy_loss
    assert POLICY_LOSSES["reinforce"] is reinforce_loss


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_reinforce_loss_and_gradient(how):
    """L = −agg(A·log π): value by loops, ∂L/∂logp = −A·w with the aggregation's weights
    w (1/Σm, 1/(B'·|o_i|), 1/(B·N)), no ratio or clipping (a ratio far outside [1 ± ε] changes
    nothing), zero on padding."""
    logp, old, adv, mask = _ppo_inputs(1)
    far_old = old - 3.0                           # ratio e³: would be clipped by PPO
    want = _aggregate_loops(-adv * logp.astype(np.float64), mask, how)
    f = lambda lp, o: reinforce_loss(lp, o, jnp.asarray(adv), jnp.asarray(mask),  # noqa: E731
                                     aggregation=how)[0]
    np.testing.assert_allclose(float(f(jnp.asarray(logp), jnp.asarray(old))), want, rtol=1e-5)
    g = np.asarray(jax.grad(f)(jnp.asarray(logp), jnp.asarray(old)))
    g_far = np.asarray(jax.grad(f)(jnp.asarray(logp), jnp.asarray(far_old)))
    lengths = mask.sum(1)
    w = {"token": np.full(B, 1.0 / mask.sum()), "sequence": 1.0 / (B * lengths),
         "budget": np.full(B, 1.0 / (B * N))}[how]
    np.testing.assert_allclose(g, -adv * w[:, None] * mask, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_far, g, rtol=1e-6)
    _, m = reinforce_loss(*map(jnp.asarray, (old, old, adv, mask)), aggregation=how)
    assert float(m["ratio"]) == pytest.approx(1.0) and float(m["approx_kl"]) == pytest.approx(0.0)


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_kl_loss_aggregation(how):
    """The loss-side KL (k3 here, GRPO's) per aggregation equals the loop reference on the
    per-token k3, with no gradient into the reference log-probs."""
    logp, old, _, mask = _ppo_inputs(2)
    log_r = old.astype(np.float64) - logp
    k3 = np.exp(log_r) - 1 - log_r
    f = lambda lp, ref: kl_loss(lp, ref, jnp.asarray(mask), estimator="k3",  # noqa: E731
                                aggregation=how)
    np.testing.assert_allclose(float(f(jnp.asarray(logp), jnp.asarray(old))),
                               _aggregate_loops(k3, mask, how), rtol=1e-5)
    assert np.all(np.asarray(jax.grad(f, argnums=1)(jnp.asarray(logp), jnp.asarray(old))) == 0)


# --------------------------------------------------------------------------- configs
def test_presets_and_validation():
    """Presets: the PPO budget of RM-scored samples (64 per iteration), no critic, no whitening;
    bad aggregations and group estimators with G = 1 are config errors naming the field."""
    ppo = PPOHParams()
    for name, make in PRESETS.items():
        hp = make()
        assert hp.rollout_size == ppo.rollout_size == 64, name
        if name in ("grpo", "dr_grpo", "rloo"):   # the later presets: test_zoo2.py
            assert hp.critic == "none" and not hp.whiten_advantages and hp.group_size == 4
    g, d, r = grpo_hparams(), dr_grpo_hparams(), rloo_hparams()
    assert (g.kl_in_loss, g.kl_coef, g.loss_aggregation, g.epochs, g.minibatches) == \
        ("k3", 0.04, "sequence", 2, 4)
    assert (d.advantage, d.loss_aggregation) == ("dr_grpo", "budget")
    assert (r.policy_loss, r.kl_in_loss, r.kl_coef, r.epochs, r.minibatches) == \
        ("reinforce", "", 0.05, 1, 1)
    assert grpo_hparams(kl_coef=0.1).kl_coef == 0.1
    with pytest.raises(TypeError):
        grpo_hparams(no_such_field=1)
    with pytest.raises(ConfigError, match="loss_aggregation"):
        PPOHParams(loss_aggregation="mean")
    with pytest.raises(ConfigError, match="group_size"):
        PPOHParams(advantage="rloo", critic="none")
    # the reference's samples are off-policy: only RAFT's SFT on the winners takes them
    with pytest.raises(ConfigError, match="sample_from"):
        PPOHParams(sample_from="reference")
    with pytest.raises(ConfigError, match="sample_from"):
        raft_hparams(sample_from="reference", rescore_policy=False)
    with pytest.raises(ConfigError, match="whiten"):
        raft_hparams(whiten_advantages=True)
    assert raft_hparams(sample_from="reference").train_rows == 16
    for m in METHODS:
        cfg = online_config(m)
        assert cfg.ppo == PRESETS[m]() and cfg.iterations == 40
    assert online_config("grpo", kl_coef=0.2).ppo.kl_coef == 0.2
    with pytest.raises(ValueError, match="method"):
        online_config("dpo")


# --------------------------------------------------------------------------- bandit
BETA = 0.5


def _grpo_fixed_point(pi_ref, rewards, beta, *, scale_std, kl, steps=20000, lr=0.5):
    """The stationary policy of a one-token GRPO-family update, by exact enumeration over all
    V^G groups (float64): the expected gradient in the logits z of
    E_group[1/G Σ_i A_i log π(y_i)] (A from the group, as in the loops above) equals β times the
    expected gradient of the loss-side KL: ``k3`` → ∇KL(π_SFT ‖ π) = π − π_SFT (forward);
    ``k2`` → ∇KL(π ‖ π_SFT) = π ⊙ (log π/π_SFT − KL). Solved by gradient ascent to a residual
    < 1e-9."""
    v = len(pi_ref)
    groups = np.array(list(itertools.product(range(v), repeat=G)))        # [V^G, G]
    onehot = np.eye(v)[groups]                                             # [V^G, G, V]
    r = rewards[groups]
    mean = r.mean(1, keepdims=True)
    adv = r - mean
    if scale_std:
        adv = adv / (r.std(1, ddof=1, keepdims=True) + GRPO_EPS)
    z = np.log(pi_ref)
    for _ in range(steps):
        pi = np.exp(z - z.max())
        pi /= pi.sum()
        prob = np.prod(pi[groups], axis=1)                                 # [V^G]
        g_pg = np.einsum("k,kg,kgv->v", prob, adv, onehot - pi) / G
        if kl == "k3":
            g_kl = pi - pi_ref
        else:
            lr_ = np.log(pi / pi_ref)
            g_kl = pi * (lr_ - pi @ lr_)
        step = g_pg - beta * g_kl
        z = z + lr * step
        if np.abs(step).max() < 1e-9:
            break
    assert np.abs(step).max() < 1e-7
    return pi


def test_bandit_rloo_reaches_the_kl_regularised_optimum():
    """RLOO (leave-one-out REINFORCE, reward-side k1, the preset's one update per rollout) on the
    one-step bandit: π → π*(y) ∝ π_SFT(y)·exp(r(y)/β) (the baseline is unbiased)."""
    hp = rloo_hparams(kl_coef=BETA, no_eos_penalty=0.0)
    pi, pi_ref, table = run_bandit(hp, iters=150, learning_rate=4e-2)
    target = kl_regularised_optimum(pi_ref, table, BETA)
    assert tv(pi, target) < 0.05, (pi.round(3), target.round(3))
    assert tv(pi_ref, target) > 0.2


def test_bandit_dr_grpo_with_reverse_kl_reaches_the_scaled_optimum():
    """Dr. GRPO's mean baseline includes the sample itself, so its expected update is
    (G−1)/G·∇E[r]: with the reverse-KL gradient in the loss (k2) it reaches
    π ∝ π_SFT·exp((G−1)/G · r/β) — the exact enumeration agrees — distinct from β's optimum."""
    hp = dr_grpo_hparams(kl_coef=BETA, kl_in_loss="k2", no_eos_penalty=0.0)
    pi, pi_ref, table = run_bandit(hp)
    target = kl_regularised_optimum(pi_ref, table, BETA * G / (G - 1))
    exact = _grpo_fixed_point(pi_ref, table, BETA, scale_std=False, kl="k2")
    np.testing.assert_allclose(exact, target, atol=1e-6)
    assert tv(pi, target) < 0.05, (pi.round(3), target.round(3))
    assert tv(target, kl_regularised_optimum(pi_ref, table, BETA)) > 0.05
    assert tv(pi_ref, target) > 0.15   # the test is not passed by standing still


def test_bandit_grpo_reaches_its_exact_fixed_point():
    """GRPO as preset (std-normalised group advantages, clipped ratio, β·k3 in the loss) on the
    bandit reaches the stationary point computed by exact enumeration over all groups. That point
    is *not* π_SFT·exp(r/β): k3 as a loss pulls along the forward KL and the std normalisation
    rescales the reward, so the test also checks the two differ."""
    hp = grpo_hparams(kl_coef=BETA, no_eos_penalty=0.0)
    pi, pi_ref, table = run_bandit(hp)
    target = _grpo_fixed_point(pi_ref, table, BETA, scale_std=True, kl="k3")
    assert tv(pi, target) < 0.05, (pi.round(3), target.round(3))
    assert tv(target, kl_regularised_optimum(pi_ref, table, BETA)) > 0.05
    assert tv(pi_ref, target) > 0.2
