"""Online DPO on the compiled PPO iteration (``advantage="pair"``, ``policy_loss="dpo"``): the
pair choice by hand and on two halves of a batch, and the whole iteration against a written-out
reference (loops pick each group's best and worst, then DPO steps against the reference)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_group import B, G, PROMPTS, _padded_batch, run_group_iteration

from rlhf_jax.configs import ConfigError
from rlhf_jax.ops import token_logprobs
from rlhf_jax.rl.advantages import ADVANTAGES, token_rewards
from rlhf_jax.rl.group import pair_rows
from rlhf_jax.rl.ppo import PPOHParams
from rlhf_jax.rl.presets import online_dpo_hparams, raft_hparams
from rlhf_jax.sampling import response_logits


def _pair(scores):
    r = token_rewards(jnp.asarray(scores, jnp.float32), jnp.zeros((4, 1)), jnp.ones((4, 1)),
                      kl_coef=0.0)
    adv = ADVANTAGES["pair"](r, jnp.zeros((4, 1)), jnp.ones((4, 1)), discount=1.0,
                             gae_lambda=1.0, group_size=4)[0]
    data, w, gid = pair_rows({"i": jnp.arange(4)}, r[:, 0], jnp.arange(4), group_size=4)
    return np.asarray(adv)[:, 0], np.asarray(data["i"])[0], float(w[0]), int(gid[0])


def test_pair_is_each_groups_best_and_worst_by_hand():
    """Scores (1, 2, 3, 6): +1 on the 6, −1 on the 1, pair (3, 0); ties go to the first of
    equal ones (5, 6, 1, 6): pair (1, 2); a group of equal scores has no pair (weight 0,
    advantages 0)."""
    adv, rows, w, gid = _pair([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_array_equal(adv, [-1, 0, 0, 1])
    assert (list(rows), w, gid) == ([3, 0], 1.0, 0)
    adv, rows, w, _ = _pair([5.0, 6.0, 1.0, 6.0])
    np.testing.assert_array_equal(adv, [0, 1, -1, 0])
    assert (list(rows), w) == ([1, 2], 1.0)
    adv, _, w, _ = _pair([0.7] * 4)
    np.testing.assert_array_equal(adv, 0.0)
    assert w == 0.0


def test_pair_rows_agree_with_the_advantage_and_are_local():
    """``pair_rows`` takes the rows the ``pair`` advantage marks +1 (first) and −1 (second),
    with global group ids; two halves of the batch (two devices) give the whole batch's pairs."""
    rewards, values, mask, _ = _padded_batch(5)
    seq = jnp.asarray((rewards * mask).sum(1))
    data = {"x": jnp.arange(B * 3).reshape(B, 3), "mask": jnp.asarray(mask)}
    out, w, gid = pair_rows(data, seq, jnp.arange(B), group_size=G)
    assert out["x"].shape == (PROMPTS, 2, 3) and out["mask"].shape == (PROMPTS, 2, mask.shape[1])
    adv = np.asarray(ADVANTAGES["pair"](jnp.asarray(rewards), jnp.asarray(values),
                                        jnp.asarray(mask), discount=1.0, gae_lambda=1.0,
                                        group_size=G)[0])
    sign = np.where(mask.sum(1) > 0, adv.sum(1) / mask.sum(1), 0)
    np.testing.assert_array_equal(np.asarray(out["x"])[:, 0, 0] // 3, np.flatnonzero(sign > 0))
    np.testing.assert_array_equal(np.asarray(out["x"])[:, 1, 0] // 3, np.flatnonzero(sign < 0))
    np.testing.assert_array_equal(w, 1.0)
    np.testing.assert_array_equal(gid, np.arange(PROMPTS))
    h = 2 * G
    parts = [pair_rows(jax.tree.map(lambda x: x[s], data), seq[s], jnp.arange(B)[s],
                       group_size=G) for s in (slice(0, h), slice(h, B))]
    np.testing.assert_array_equal(np.concatenate([np.asarray(p[0]["x"]) for p in parts]),
                                  out["x"])
    np.testing.assert_array_equal(np.concatenate([np.asarray(p[2]) for p in parts]), gid)


def _dpo(params, ref_params, model, rows_p, rows_m, responses, mask, pairs, beta):
    """DPO written out: summed response log-probs of policy and reference, −log σ(β·h) averaged
    over the (chosen, rejected) index pairs."""
    def seq_logp(p):
        logits, _ = response_logits(model, p, rows_p, rows_m, responses, mask)
        return jnp.sum(token_logprobs(logits, responses) * mask, -1)

    lp, ref = seq_logp(params), jax.lax.stop_gradient(seq_logp(ref_params))
    w, lo = pairs[:, 0], pairs[:, 1]
    h = (lp[w] - ref[w]) - (lp[lo] - ref[lo])
    return -jnp.mean(jax.nn.log_sigmoid(beta * h))


def _minibatches(key, epochs: int, minibatches: int, ids) -> list[np.ndarray]:
    """The pairs of each update, written out: per epoch a key from ``split(k_perm, epochs)``,
    pairs grouped in blocks of ``minibatches`` consecutive group ids, each block's rows sent to
    the minibatches by a permutation drawn from ``fold_in(epoch key, block)`` (the iteration's
    ``minibatch_indices`` rule, as ``test_ppo``'s reference writes it out)."""
    k_perm = jax.random.split(key)[1]
    out = []
    for ek in jax.random.split(k_perm, epochs):
        assign = np.array([int(jax.random.permutation(jax.random.fold_in(ek, r // minibatches),
                                                      minibatches)[r % minibatches])
                           for r in ids])
        out.extend(np.flatnonzero(assign == m) for m in range(minibatches))
    return out


@pytest.mark.parametrize("sample_from,minibatches", [("policy", 1), ("reference", 2)])
def test_online_dpo_iteration_is_dpo_on_each_groups_best_and_worst(sample_from, minibatches):
    """The compiled iteration (G = 4, ranked by score − β·Σk1, 2 epochs of one or two
    minibatches) equals a written-out reference on the rollout it returns: loops pick each
    group's best and worst by R, then one optimiser step per minibatch on the DPO loss
    (β_DPO = 0.5) of its pairs against the frozen reference — with two minibatches, the pairs
    split by the iteration's permutation rule. Pairs taken the other way round land elsewhere."""
    hp = online_dpo_hparams(prompts_per_iter=8, group_size=4, epochs=2, minibatches=minibatches,
                            kl_coef=0.3, dpo_beta=0.5, no_eos_penalty=0.0,
                            sample_from=sample_from)
    updates = 2 * minibatches
    models, pol, frozen, got, metrics, ro, rows_p, rows_m = run_group_iteration(hp, updates)

    m = jnp.asarray(ro["mask"], jnp.float32)
    resp = ro["responses"]

    def seq_logp(params):
        logits, _ = response_logits(models.policy, params, rows_p, rows_m, resp, m)
        return np.asarray(jnp.sum(token_logprobs(logits, resp) * m, -1), np.float64)

    r = np.asarray(ro["rm_score"], np.float64) - 0.3 * (seq_logp(pol.params) -
                                                         seq_logp(frozen.ref))
    pairs = []
    for g in range(8):
        members = list(r[4 * g:4 * g + 4])
        pairs.append((4 * g + members.index(max(members)), 4 * g + members.index(min(members))))
    pairs = np.array(pairs)
    assert len(set(pairs[:, 0] % 4)) > 1 and np.all(pairs[:, 0] != pairs[:, 1])

    loss = lambda params, pr: _dpo(params, frozen.ref, models.policy, rows_p,  # noqa: E731
                                   rows_m, resp, m, pr, 0.5)
    step = jax.jit(lambda s, pr: s.apply_gradients(jax.grad(loss)(s.params, pr)))
    batches = _minibatches(jax.random.key(7), 2, minibatches, np.arange(8))
    assert all(len(i) == 8 // minibatches for i in batches)

    def run(pairs):
        state, losses = pol, []
        for i in batches:
            losses.append(float(loss(state.params, pairs[i])))
            state = step(state, pairs[i])
        return state, losses

    want, losses = run(pairs)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                 got.policy.params, want.params)
    swapped = pairs[:, ::-1].copy()
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3 for a, b in zip(
        jax.tree.leaves(got.policy.params), jax.tree.leaves(run(swapped)[0].params)))
    if minibatches > 1:   # the split matters: one epoch's halves in the other order differ
        other = [batches[1], batches[0], *batches[2:]]
        state = pol
        for i in other:
            state = step(state, pairs[i])
        assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3 for a, b in zip(
            jax.tree.leaves(got.policy.params), jax.tree.leaves(state.params)))
    # the logged loss is the mean of the updates' DPO losses
    assert float(metrics["train/policy_loss"]) == pytest.approx(np.mean(losses), rel=1e-4)
    assert float(metrics["rollout/pairs"]) == 1.0


def test_online_dpo_config_errors_name_the_field():
    """``pair`` and ``dpo`` come together, with no critic, no loss-side KL (nor an exact
    reward-side one, which would add one), no whitening, no TIS weights and β_DPO > 0; the preset is 32 prompts × G = 2 (PPO's 64 samples), one DPO step per rollout."""
    hp = online_dpo_hparams()
    assert (hp.rollout_size, hp.train_rows, hp.epochs, hp.minibatches, hp.dpo_beta) == (
        64, 32, 1, 1, 0.1)
    for bad, field in ((dict(policy_loss="reinforce"), "policy_loss"),
                       (dict(critic="separate"), "advantage"),
                       (dict(kl_in_loss="k3"), "advantage"),
                       (dict(dpo_beta=0.0), "advantage"),
                       (dict(whiten_advantages=True), "advantage"),
                       (dict(group_size=1), "group_size"),
                       (dict(kl_estimator="exact"), "kl_estimator"),
                       (dict(tis_cap=2.0), "tis_cap"),
                       (dict(dpo_beta=-1.0), "dpo_beta")):
        with pytest.raises(ConfigError, match=field):
            online_dpo_hparams(**bad)
    with pytest.raises(ConfigError, match="policy_loss"):
        raft_hparams(policy_loss="dpo")
    with pytest.raises(ConfigError, match="kl_estimator"):
        raft_hparams(kl_estimator="exact")
    with pytest.raises(ConfigError, match="policy_loss"):
        PPOHParams(policy_loss="nope")
