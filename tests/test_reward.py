"""Reward losses and the simulated labeller against slow references and invariances."""

from __future__ import annotations

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.labeler import (noise_ceiling, plackett_luce_ranking, tie_identical)
from rlhf_jax.losses.reward import (bradley_terry_loss, kwise_bradley_terry_loss,
                                    reward_at_last_token)
from rlhf_jax.models import create_model, preset
from rlhf_jax.stages.reward_model import make_score_fn


def sequence_rewards(model, params, prompts, prompt_mask, responses, response_mask, *,
                     lm_coef_head=None):
    """The RM's score function on ``[prompt | response]`` rows built from the parts."""
    score = make_score_fn(model, prompt_len=prompts.shape[1], lm_coef_head=lm_coef_head)
    return score(params, jnp.concatenate([prompts, responses], axis=1),
                 jnp.concatenate([prompt_mask, response_mask], axis=1))


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def kwise_reference(rewards, ranking, valid, margin):
    """Loop over prompts and over every pair: the definition, written slowly."""
    per_prompt = []
    for r, rk, v in zip(rewards, ranking, valid):
        idx = [i for i in range(len(r)) if v[i]]
        k = len(idx)
        if k < 2:
            continue
        total = 0.0
        for i, j in itertools.permutations(idx, 2):
            if rk[i] > rk[j]:
                total += -_log_sigmoid(r[i] - r[j] - margin)
        per_prompt.append(total / math.comb(k, 2))
    return float(np.mean(per_prompt))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kwise_loss_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    p, k = 6, 5
    rewards = rng.normal(size=(p, k)).astype(np.float32)
    ranking = rng.integers(0, 3, size=(p, k)).astype(np.float32)   # many ties
    valid = (rng.random((p, k)) > 0.2).astype(np.float32)
    loss, m = jax.jit(lambda a, b, c: kwise_bradley_terry_loss(a, b, mask=c, margin=0.3))(
        rewards, ranking, valid)
    np.testing.assert_allclose(float(loss), kwise_reference(rewards, ranking, valid, 0.3),
                               rtol=1e-5)
    # accuracy over untied pairs, by hand
    agree, n = 0, 0
    for r, rk, v in zip(rewards, ranking, valid):
        for i, j in itertools.permutations(range(k), 2):
            if v[i] and v[j] and rk[i] > rk[j]:
                n += 1
                agree += r[i] > r[j]
    np.testing.assert_allclose(float(m["accuracy"]), agree / n, rtol=1e-6)
    assert int(m["pairs"]) == n


def test_k2_equals_pairwise_loss():
    rng = np.random.default_rng(3)
    rw, rl = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    pair_loss, pm = bradley_terry_loss(rw, rl, margin=0.5)
    k_loss, km = kwise_bradley_terry_loss(np.stack([rw, rl], 1), np.tile([1.0, 0.0], (8, 1)),
                                          margin=0.5)
    np.testing.assert_allclose(float(pair_loss), float(k_loss), rtol=1e-6)
    np.testing.assert_allclose(float(pm["accuracy"]), float(km["accuracy"]))
    np.testing.assert_allclose(float(pm["margin"]), float(km["margin"]), rtol=1e-6)
    ref = np.mean(-_log_sigmoid(rw - rl - 0.5))
    np.testing.assert_allclose(float(pair_loss), ref, rtol=1e-5)


def test_ties_contribute_nothing():
    rewards = np.array([[0.3, -1.2, 2.0]], np.float32)
    all_tied = kwise_bradley_terry_loss(rewards, np.ones((1, 3), np.float32))[0]
    assert float(all_tied) == 0.0
    one_pair = kwise_bradley_terry_loss(rewards, np.array([[1.0, 0.0, 0.0]], np.float32))[0]
    expected = (-_log_sigmoid(0.3 + 1.2) - _log_sigmoid(0.3 - 2.0)) / 3
    np.testing.assert_allclose(float(one_pair), expected, rtol=1e-5)


def test_kwise_loss_invariant_to_response_order():
    rng = np.random.default_rng(4)
    rewards = rng.normal(size=(4, 4)).astype(np.float32)
    ranking = rng.permutation(np.tile(np.arange(4.0), (4, 1)).T).T.astype(np.float32)
    perm = rng.permutation(4)
    a = kwise_bradley_terry_loss(rewards, ranking)
    b = kwise_bradley_terry_loss(rewards[:, perm], ranking[:, perm])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


def test_kwise_gradient_finite_and_descends():
    rewards = jnp.zeros((3, 4))
    ranking = jnp.tile(jnp.arange(4.0), (3, 1))
    g = jax.grad(lambda r: kwise_bradley_terry_loss(r, ranking)[0])(rewards)
    assert np.isfinite(np.asarray(g)).all()
    # higher-ranked responses get pushed up: the gradient is decreasing in rank
    assert (np.diff(np.asarray(g[0])) < 0).all()


def test_reward_at_last_token():
    values = jnp.arange(12.0).reshape(2, 6)
    mask = jnp.array([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(reward_at_last_token(values, mask)), [3.0, 11.0])


def test_padded_equals_unpadded_scores():
    model, params = create_model(preset("test"), jax.random.key(0), heads=("reward",))
    prompt = jnp.array([[1, 5, 6, 7]])
    resp = jnp.array([[8, 9, 2]])
    base = sequence_rewards(model, params, prompt, jnp.ones_like(prompt), resp, jnp.ones_like(resp))
    # more left padding on the prompt, more right padding on the response
    p2 = jnp.array([[0, 0, 1, 5, 6, 7]])
    r2 = jnp.array([[8, 9, 2, 0, 0]])
    padded = sequence_rewards(model, params, p2, (p2 != 0) | (jnp.arange(6) >= 2)[None],
                              r2, jnp.array([[1, 1, 1, 0, 0]]))
    np.testing.assert_allclose(np.asarray(base), np.asarray(padded), atol=1e-5)


def test_last_token_readout_matches_numpy_reference_forward():
    """The score function runs the last block at the last real token only; the reward equals the
    NumPy reference forward's head output read there (left-padded prompts, right-padded
    responses of different lengths)."""
    import references as ref

    cfg = preset("test")
    model, params = create_model(cfg, jax.random.key(3), heads=("reward", "coef"))
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, cfg.vocab_size, (3, 4)).astype(np.int32)
    prompt_mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], np.int32)
    resp = rng.integers(4, cfg.vocab_size, (3, 5)).astype(np.int32)
    resp_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], np.int32)
    got = sequence_rewards(model, params, prompts, prompt_mask, resp, resp_mask)
    tokens, mask = np.concatenate([prompts, resp], 1), np.concatenate([prompt_mask, resp_mask], 1)
    _, _, scalars = ref.gpt_forward(params, cfg, tokens, mask)
    last = [8, 5, 6]
    np.testing.assert_allclose(np.asarray(got), scalars["reward"][np.arange(3), last], atol=1e-4)
    # the LM-likelihood readout (outputs from the last prompt token on): head + coef · log p(resp)
    got_lm = sequence_rewards(model, params, prompts, prompt_mask, resp, resp_mask,
                              lm_coef_head="coef")
    logits, _, _ = ref.gpt_forward(params, cfg, tokens, mask)
    loglik = (ref.token_logprobs(logits[:, 3:-1], resp) * resp_mask).sum(-1)
    want = (scalars["reward"][np.arange(3), last]
            + scalars["coef"][np.arange(3), last] * loglik)
    np.testing.assert_allclose(np.asarray(got_lm), want, atol=1e-4)


def test_plackett_luce_pairwise_marginals_are_bradley_terry():
    gold = np.tile(np.array([1.0, 0.0, -1.0, -2.0], np.float32), (40000, 1))
    ranking = plackett_luce_ranking(gold, 1.5, np.random.default_rng(0))
    for i, j in itertools.combinations(range(4), 2):
        p = 1 / (1 + np.exp(-(gold[0, i] - gold[0, j]) / 1.5))
        emp = np.mean(ranking[:, i] > ranking[:, j])
        assert abs(emp - p) < 4 * np.sqrt(p * (1 - p) / len(gold)), (i, j, emp, p)


def test_noise_ceiling_matches_monte_carlo():
    rng = np.random.default_rng(1)
    gold = rng.choice([1.0, 0.0, -1.0, -2.0], size=(3000, 4)).astype(np.float32)
    tau = 1.5
    analytic = noise_ceiling(gold, tau)
    # Monte Carlo: the best possible predictor (the gold ordering) vs sampled noisy labels
    ranking = plackett_luce_ranking(np.repeat(gold, 10, 0), tau, rng)
    g = np.repeat(gold, 10, 0)
    i, j = np.triu_indices(4, 1)
    dg, dl = g[:, i] - g[:, j], ranking[:, i] - ranking[:, j]
    mc = np.mean((np.sign(dg) == np.sign(dl))[dg != 0])
    assert abs(mc - analytic) < 0.005, (mc, analytic)


def test_identical_responses_are_tied():
    ranking = np.array([[3.0, 2.0, 1.0, 0.0]], np.float32)
    out = tie_identical([["a", "b", "a", "c"]], ranking)
    np.testing.assert_array_equal(out, [[2.0, 2.0, 2.0, 0.0]])


def test_lm_readout_adds_coef_times_response_loglik_and_ignores_padding():
    """reward = head(h_last) + c(h_last) · Σ log p(response tokens | prefix), padding-invariant."""
    model, params = create_model(preset("test"), jax.random.key(1), heads=("reward", "coef"))
    prompt = jnp.array([[1, 5, 6, 7]])
    resp = jnp.array([[8, 9, 2]])
    kw = dict(lm_coef_head="coef")
    got = sequence_rewards(model, params, prompt, jnp.ones_like(prompt), resp, jnp.ones_like(resp),
                           **kw)
    tokens = jnp.concatenate([prompt, resp], axis=1)
    out = model.apply(params, tokens)
    logp = jax.nn.log_softmax(out.logits[0], axis=-1)
    ll = sum(float(logp[t - 1, tokens[0, t]]) for t in range(4, 7))   # the 3 response tokens
    want = float(out.scalars["reward"][0, -1]) + float(out.scalars["coef"][0, -1]) * ll
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-5, atol=1e-5)
    p2 = jnp.array([[0, 0, 1, 5, 6, 7]])
    r2 = jnp.array([[8, 9, 2, 0, 0]])
    padded = sequence_rewards(model, params, p2, (jnp.arange(6) >= 2)[None].astype(jnp.int32),
                              r2, jnp.array([[1, 1, 1, 0, 0]]), **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(padded), atol=1e-4)


def test_preference_arrays_widen_to_stored_texts_that_encode_past_the_budget():
    """A stored text can encode to more ids than the policy sampled (a BPE's canonical
    segmentation of a sampled text); the arrays widen to the longest response, nothing is cut,
    and one that would run past the model's context is an error naming it."""
    from rlhf_jax.data.task import Prompt
    from rlhf_jax.labeler import Preferences
    from rlhf_jax.stages.reward import preference_arrays
    from rlhf_jax.tasks import TaskConfig

    class Chars:   # one id per character
        bos_id, eos_id, pad_id = 1, 2, 0

        def encode(self, text):
            return [3 + ord(c) - ord("a") for c in text]

    def prefs(responses):
        return Preferences([Prompt("p0", "ab", True)], [responses],
                           np.array([[1.0, 0.0]], np.float32), np.zeros((1, 2), np.float32),
                           [["x", "x"]])

    shapes = TaskConfig(prompt_len=4, max_new_tokens=3)
    d = preference_arrays(Chars(), prefs(["abcdef", "a"]), shapes, max_len=16)
    assert d["responses"].shape == (1, 2, 7)
    np.testing.assert_array_equal(d["responses"][0, 0], [3, 4, 5, 6, 7, 8, 2])
    np.testing.assert_array_equal(d["response_mask"][0, 1], [1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(d["prompts"][0], [0, 1, 3, 4])
    # within the budget: the budget's width (max_new_tokens + EOS)
    assert preference_arrays(Chars(), prefs(["ab", "a"]), shapes,
                             max_len=16)["responses"].shape == (1, 2, 4)
    with pytest.raises(ValueError, match="6 tokens.*context of 10"):
        preference_arrays(Chars(), prefs(["abcdef", "a"]), shapes, max_len=10)


def test_a_frozen_trunk_stays_at_the_sft_weights_under_gradient_and_weight_decay(tmp_path):
    """``freeze_trunk`` stops the trunk's gradient, and AdamW's decoupled decay skips it too (it
    shrank the trunk's matrices: 0.3% off the SFT weights after 30 steps at decay 0.1): with a
    real loss the trunk stays bit for bit while the head trains; with a zero loss the head's
    matrix only decays."""
    from rlhf_jax.stages.common import train_stage
    from rlhf_jax.stages.reward_model import frozen_trunk, with_frozen
    from rlhf_jax.runs import RunDir
    from rlhf_jax.train import OptimConfig

    model, params = create_model(preset("test", vocab_size=16, max_len=8), jax.random.key(0),
                                 heads=("reward",))
    tokens = jnp.arange(8, dtype=jnp.int32).reshape(1, 8) % 16
    before = jax.tree.map(np.array, params)
    optim = OptimConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5)
    for scale in (1.0, 0.0):   # 0: no gradient, only the decay moves anything
        def loss(p, batch, key=None, axis_name=None):
            return scale * model.apply(p, tokens).scalars["reward"].sum(), {}

        after = train_stage(params, with_frozen(loss, trunk=True, coef_kernel=False),
                            lambda s: {}, seed=0, steps=2, optim=optim,
                            run=RunDir(tmp_path / str(scale)), prefix="rm", log_every=1,
                            checkpoint_every=0, frozen=frozen_trunk)
        trunk = {k: v for k, v in after.items() if k != "heads"}
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, trunk),
                                    {k: v for k, v in before.items() if k != "heads"})
        kernel, was = np.asarray(after["heads"]["reward"]["kernel"]), before["heads"]["reward"]
        if scale:
            assert not np.allclose(kernel, was["kernel"])
        else:
            assert np.all(np.abs(kernel) < np.abs(was["kernel"]))
