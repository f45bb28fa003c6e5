"""DAPO, GSPO / GSPO-token, REINFORCE++ and the importance-weighted k3 (issue #27): NumPy
references on random inputs (masked = sliced, finite gradients), GSPO-token's gradient identity,
iw_k3's gradient against the exact ∇KL, global reductions under a named axis (``vmap`` over
shards stands in for devices; the full DAPO iteration on 4 devices is ``check_dapo`` in
multidevice_checks.py), the presets, a bandit, and bit-exact resume."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ppo import kl_regularised_optimum, run_bandit, tv

from rlhf_jax.configs import ConfigError
from rlhf_jax.losses.gspo import gspo_loss, gspo_token_loss
from rlhf_jax.losses.ppo import clipped_policy_loss, kl_loss
from rlhf_jax.ops import kl_per_token
from rlhf_jax.rl.advantages import gae, overlong_penalty, whiten
from rlhf_jax.rl.dynamic_sampling import select_groups
from rlhf_jax.rl.ppo import PPOHParams
from rlhf_jax.rl.presets import (PRESETS, dapo_hparams, gspo_hparams, gspo_token_hparams,
                                 reinforce_pp_hparams)

B, N = 8, 6


def _batch(seed, b=B, n=N, scale=0.3):
    """Random ``[b, n]`` log-probs (π, π_old, π_SFT), advantages and a right-padded mask of random
    lengths (one empty row, one full), junk (±1e3) on padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, n + 1, b)
    lengths[0], lengths[1] = 0, n
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    junk = 1e3 * rng.normal(size=(b, n))
    old = -rng.uniform(0.1, 3.0, (b, n))
    logp = old + scale * rng.normal(size=(b, n))
    ref = old + scale * rng.normal(size=(b, n))
    adv = rng.normal(size=(b, n))
    pad = lambda x: np.where(mask > 0, x, junk).astype(np.float32)
    return pad(logp), pad(old), pad(ref), pad(adv), mask, lengths


# --------------------------------------------------------------------------- iw_k3
def test_iw_k3_values_and_masked_loss_equal_numpy_on_sliced_rows():
    logp, old, ref, _, mask, lengths = _batch(0)
    got = np.asarray(kl_per_token(jnp.asarray(logp), jnp.asarray(ref), estimator="iw_k3",
                                  old_logp=jnp.asarray(old)))
    lr = ref.astype(np.float64) - logp
    want = np.exp(logp.astype(np.float64) - old) * (np.exp(lr) - lr - 1)
    np.testing.assert_allclose(got[mask > 0], want[mask > 0], rtol=1e-5, atol=1e-8)
    # the token mean of the loss side over the counted tokens = the mean over the sliced rows
    sliced = np.concatenate([want[i, :lengths[i]] for i in range(B)])
    fn = lambda lp: kl_loss(lp, jnp.asarray(ref), jnp.asarray(mask), estimator="iw_k3",
                            old_logp=jnp.asarray(old))
    np.testing.assert_allclose(float(jax.jit(fn)(jnp.asarray(logp))), sliced.mean(), rtol=1e-5)
    g = np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(logp)))
    assert np.isfinite(g).all() and (g[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="old_logp"):
        kl_per_token(jnp.asarray(logp), jnp.asarray(ref), estimator="iw_k3")


def test_iw_k3_gradient_is_the_exact_kl_gradient_off_policy():
    """Samples from π_old ≠ π: E_{π_old}[iw_k3] = KL(π ‖ π_SFT) as a function of π's logits, so
    its gradient is the exact ∇KL (enumerated over a 7-token vocabulary); plain k3 under the same
    samples has neither that value nor that gradient."""
    rng = np.random.default_rng(1)
    z, z_old, z_ref = (jnp.asarray(rng.normal(size=7) * 1.5, jnp.float32) for _ in range(3))
    tokens = jnp.arange(7)
    lq_old = jax.nn.log_softmax(z_old)

    def expected(z, estimator):   # Σ_y π_old(y) · estimator(y)
        lp, lr = jax.nn.log_softmax(z), jax.nn.log_softmax(z_ref)
        k = kl_per_token(lp[tokens], lr[tokens], estimator=estimator, old_logp=lq_old[tokens])
        return jnp.sum(jnp.exp(lq_old) * k)

    exact = lambda z: kl_per_token(None, None, estimator="exact", logits=z, ref_logits=z_ref)
    np.testing.assert_allclose(expected(z, "iw_k3"), exact(z), rtol=1e-5)
    grad = jax.jit(jax.grad(expected), static_argnums=1)
    g_iw, g_exact = grad(z, "iw_k3"), jax.jit(jax.grad(exact))(z)
    np.testing.assert_allclose(g_iw, g_exact, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(grad(z, "k3") - g_exact)).max() > 0.05


# --------------------------------------------------------------------------- DAPO's clip
def _clip_loop(logp, old, adv, mask, lo, hi):
    terms = []
    for i in range(B):
        for t in range(N):
            if mask[i, t]:
                r = np.exp(float(logp[i, t]) - float(old[i, t]))
                terms.append(max(-adv[i, t] * r, -adv[i, t] * min(max(r, 1 - lo), 1 + hi)))
    return np.mean(terms)


def test_decoupled_clip_matches_loops_and_lets_rare_tokens_grow():
    logp, old, _, adv, mask, _ = _batch(2)
    fn = lambda lp, hi: clipped_policy_loss(lp, jnp.asarray(old), jnp.asarray(adv),
                                            jnp.asarray(mask), clip_eps=0.2, clip_eps_high=hi)[0]
    got = float(jax.jit(fn, static_argnums=1)(jnp.asarray(logp), 0.28))
    np.testing.assert_allclose(got, _clip_loop(logp, old, adv, mask, 0.2, 0.28), rtol=1e-5)
    np.testing.assert_allclose(float(fn(jnp.asarray(logp), None)),
                               _clip_loop(logp, old, adv, mask, 0.2, 0.2), rtol=1e-5)
    # a token with A > 0 and ratio 1.25: clipped (no gradient) at ε = 0.2, free under ε_high 0.28
    lp = old.copy()
    lp[1, 0] = old[1, 0] + np.log(1.25)
    a = np.where(mask > 0, 1.0, 0.0).astype(np.float32)
    grad = lambda hi: np.asarray(jax.grad(lambda x: clipped_policy_loss(
        x, jnp.asarray(old), jnp.asarray(a), jnp.asarray(mask), clip_eps=0.2,
        clip_eps_high=hi)[0])(jnp.asarray(lp)))
    assert grad(None)[1, 0] == 0.0 and grad(0.28)[1, 0] < 0.0
    assert np.isfinite(grad(0.28)).all()


# --------------------------------------------------------------------------- GSPO
def _gspo_loop(logp, old, adv, lengths, lo, hi):
    terms = []
    for i in range(B):
        n = lengths[i]
        if n == 0:
            continue
        s = np.exp(np.mean(logp[i, :n].astype(np.float64) - old[i, :n]))   # real tokens only
        a = np.mean(adv[i, :n].astype(np.float64))
        terms.append(max(-a * s, -a * min(max(s, 1 - lo), 1 + hi)))
    return np.mean(terms)


def _near_policy(seed):
    """A batch with log π − log π_old ~ 1e-3 (so the 3e-4 / 4e-4 clip acts on some sequences)
    and advantages equal over each response's tokens."""
    logp, old, ref, adv, mask, lengths = _batch(seed, scale=1e-3)
    adv = np.where(mask > 0, adv[:, :1], adv).astype(np.float32)
    return logp, old, adv, mask, lengths


def test_gspo_matches_loops_on_sliced_rows():
    logp, old, adv, mask, lengths = _near_policy(3)
    fn = lambda lp: gspo_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    loss, m = jax.jit(fn)(jnp.asarray(logp))
    np.testing.assert_allclose(float(loss), _gspo_loop(logp, old, adv, lengths, 3e-4, 4e-4),
                               rtol=1e-4)
    assert 0.0 < float(m["clip_frac"]) < 1.0
    g = np.asarray(jax.jit(jax.grad(lambda lp: fn(lp)[0]))(jnp.asarray(logp)))
    assert np.isfinite(g).all() and (g[mask == 0] == 0).all()
    # the padded length N instead of |y_i| would give another ratio (the test can tell)
    padded = np.exp(np.sum((logp - old) * mask, -1) / N)
    real = np.exp(np.sum((logp - old) * mask, -1) / np.maximum(lengths, 1))
    assert np.abs(padded - real)[lengths < N].max() > 1e-4
    with pytest.raises(ValueError, match="sequence"):
        gspo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                  aggregation="token")


def test_gspo_token_has_gspos_value_and_gradient_with_sequence_advantages():
    logp, old, adv, mask, _ = _near_policy(4)
    args = (jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    (l_s, m_s), g_s = jax.value_and_grad(gspo_loss, has_aux=True)(jnp.asarray(logp), *args)
    (l_t, _), g_t = jax.value_and_grad(gspo_token_loss, has_aux=True)(jnp.asarray(logp), *args)
    assert 0.0 < float(m_s["clip_frac"]) < 1.0   # clipped and unclipped sequences both present
    np.testing.assert_allclose(float(l_t), float(l_s), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_t), np.asarray(g_s), rtol=1e-5, atol=1e-9)
    assert np.abs(np.asarray(g_s)).max() > 1e-3
    # with advantages that differ along a response the two differ (the identity is not trivial)
    _, _, _, adv2, _, _ = _batch(5)
    args2 = (jnp.asarray(old), jnp.asarray(adv2), jnp.asarray(mask))
    d = jax.grad(lambda x: gspo_token_loss(x, *args2)[0])(jnp.asarray(logp)) - \
        jax.grad(lambda x: gspo_loss(x, *args2)[0])(jnp.asarray(logp))
    assert np.abs(np.asarray(d)).max() > 1e-3


def _shards(x, n=4):
    return jnp.asarray(x).reshape(n, -1, *np.shape(x)[1:])


def test_gspo_and_reinforce_pp_reductions_are_global_over_shards():
    """Under a named axis (4 shards of uneven token counts) GSPO's sequence mean and REINFORCE++'s
    advantage normalisation (γ = λ = 1 returns-to-go, whitened with psum-ed sums) equal the
    unsharded values; a per-shard normalisation would not."""
    logp, old, adv, mask, lengths = _near_policy(6)
    whole = gspo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))[0]
    sharded = jax.jit(jax.vmap(lambda *a: gspo_loss(*a, axis_name="d")[0], axis_name="d"))(
        *map(_shards, (logp, old, adv, mask)))
    np.testing.assert_allclose(np.asarray(sharded), float(whole), rtol=1e-6)

    _, _, _, rewards, mask, lengths = _batch(7)
    rewards = np.where(mask > 0, rewards, 0.0)
    rtg = np.flip(np.cumsum(np.flip(rewards, 1), 1), 1) * mask            # Σ_{s ≥ t} r_s
    tok = rtg[mask > 0]
    want = np.where(mask > 0, (rtg - tok.mean()) / np.sqrt(tok.var() + 1e-8), 0.0)

    def adv_fn(r, m, axis_name=None):
        a, _ = gae(r, jnp.zeros_like(r), m, discount=1.0, gae_lambda=1.0)
        return whiten(a, m, axis_name=axis_name)

    np.testing.assert_allclose(jax.jit(adv_fn)(jnp.asarray(rewards), jnp.asarray(mask)), want,
                               rtol=1e-4, atol=1e-5)
    got = jax.jit(jax.vmap(functools.partial(adv_fn, axis_name="d"), axis_name="d"))(
        _shards(rewards), _shards(mask))
    np.testing.assert_allclose(np.asarray(got).reshape(B, N), want, rtol=1e-4, atol=1e-5)
    local = jax.jit(jax.vmap(adv_fn))(_shards(rewards), _shards(mask))
    assert np.abs(np.asarray(local).reshape(B, N) - want).max() > 1e-2


# --------------------------------------------------------------------------- DAPO's shaping
def test_overlong_penalty_on_synthetic_lengths():
    """L_max = 12, L_cache = 4: 0 up to 8 tokens, then a ramp of −1/4 per token, −1 past 12."""
    got = overlong_penalty(jnp.asarray([0, 5, 8, 9, 10, 12, 13]), max_length=12, buffer=4)
    np.testing.assert_allclose(got, [0, 0, 0, -0.25, -0.5, -1.0, -1.0])
    for bad in (0, 13):
        with pytest.raises(ValueError, match="overlong"):
            overlong_penalty(jnp.asarray([1]), max_length=12, buffer=bad)


def _groups():
    """5 groups of G = 2: no spread, spread, spread 1e-7 (below 1e-6: none), 1e-5, spread."""
    r = np.asarray([1, 1, 0, 1, 2, 2 + 2e-7, 0, 2e-5, 3, 4], np.float64)
    data = {"mask": np.ones((10, 3), np.float32), "x": np.arange(10, dtype=np.float32)}
    return jnp.asarray(r, jnp.float32), jax.tree.map(jnp.asarray, data)


def test_dynamic_sampling_keeps_the_first_groups_with_spread_and_pads_with_weight_zero():
    r, data = _groups()
    sel = jax.jit(select_groups, static_argnames=("keep", "group_size"))
    out, ids, m = sel(data, r, keep=3, group_size=2)
    np.testing.assert_array_equal(out["x"], [2, 3, 6, 7, 8, 9])        # groups 1, 3, 4
    assert (np.asarray(out["mask"]) == 1).all() and float(m["rollout/fill_rate"]) == 1.0
    np.testing.assert_allclose(m["rollout/groups_with_spread"], 3 / 5)
    out, ids, m = sel(data, r, keep=4, group_size=2)
    np.testing.assert_array_equal(out["x"], [2, 3, 6, 7, 8, 9, 0, 1])  # padded with group 0
    np.testing.assert_array_equal(np.asarray(out["mask"]).sum(1), [3, 3, 3, 3, 3, 3, 0, 0])
    np.testing.assert_array_equal(ids, np.arange(8))
    assert float(m["rollout/fill_rate"]) == 0.75
    with pytest.raises(ValueError, match="keep_groups"):
        sel(data, r, keep=6, group_size=2)


def test_dynamic_sampling_selects_on_the_global_batch_over_shards():
    """4 groups on 2 shards (vmap with a named axis): the selection moves shard 1's groups to
    shard 0; the concatenated shares equal the 1-shard selection."""
    r = jnp.asarray([5, 5, 0, 1, 2, 3, 7, 7], jnp.float32)            # groups 1, 2 have spread
    data = {"mask": jnp.ones((8, 2)), "x": jnp.arange(8.0)}
    one, ids1, m1 = jax.jit(functools.partial(select_groups, keep=2, group_size=2))(data, r)
    sel = functools.partial(select_groups, keep=2, group_size=2, axis_name="d")
    two, ids2, m2 = jax.jit(jax.vmap(sel, axis_name="d"))(jax.tree.map(lambda x: _shards(x, 2), data),
                                                 _shards(r, 2))
    np.testing.assert_array_equal(np.asarray(two["x"]).reshape(-1), one["x"])
    np.testing.assert_array_equal(np.asarray(ids2).reshape(-1), ids1)
    np.testing.assert_array_equal(np.asarray(m2["rollout/fill_rate"]), [1.0, 1.0])
    np.testing.assert_array_equal(one["x"], [2, 3, 4, 5])


# --------------------------------------------------------------------------- presets
def test_presets_budget_and_validation():
    d, s, t, r = dapo_hparams(), gspo_hparams(), gspo_token_hparams(), reinforce_pp_hparams()
    for hp in (d, s, t, r):
        assert hp.rollout_size == PPOHParams().rollout_size == 64 and hp.critic == "none"
    assert PRESETS["dapo"] is dapo_hparams and PRESETS["reinforce_pp"] is reinforce_pp_hparams
    assert (d.clip_eps, d.clip_eps_high, d.loss_aggregation, d.kl_coef, d.kl_in_loss,
            d.keep_groups, d.overlong_buffer) == (0.2, 0.28, "token", 0.0, "", 8, 2)
    # the ramp is DAPO's only length penalty: PPO's -1 without EOS made a cut response -2
    assert d.no_eos_penalty == 0.0 and PPOHParams().no_eos_penalty == 1.0
    assert (s.policy_loss, s.clip_eps, s.clip_eps_high, s.loss_aggregation) == \
        ("gspo", 3e-4, 4e-4, "sequence")
    assert t.policy_loss == "gspo_token"
    assert (r.group_size, r.advantage, r.discount, r.gae_lambda, r.whiten_advantages,
            r.kl_estimator, r.policy_loss) == (1, "gae", 1.0, 1.0, True, "k1", "clipped")
    with pytest.raises(ConfigError, match="keep_groups"):
        dapo_hparams(keep_groups=17)
    with pytest.raises(ConfigError, match="keep_groups"):
        dapo_hparams(keep_groups=3, minibatches=8)
    with pytest.raises(ConfigError, match="loss_aggregation"):
        gspo_hparams(loss_aggregation="token")
    assert PPOHParams(kl_in_loss="iw_k3").kl_in_loss == "iw_k3"


def test_compare_method_groups():
    from rlhf_jax.stages.compare import DEFAULT, GROUPS, CompareConfig, method_cell

    assert CompareConfig().methods == DEFAULT
    assert CompareConfig(methods=("zoo2",)).methods == ("dapo", "gspo", "reinforce_pp", "kto",
                                                         "orpo")
    every = CompareConfig(methods=("all",)).methods
    assert set(every) == set(GROUPS["all"]) and len(every) == 14
    assert {"raft", "online_dpo"} <= set(every)
    # a budget that suits the group sizes but not RAFT's 2 minibatches of winners (3 prompts) is
    # refused with the config, before the shared upstream trains
    with pytest.raises(ConfigError, match="samples_per_iter: 12 does not suit raft"):
        CompareConfig(methods=("all",), samples_per_iter=12)
    assert CompareConfig(methods=("ppo", "zoo2", "dapo")).methods[:3] == ("ppo", "dapo", "gspo")
    cfg = CompareConfig(methods=("zoo2",), samples_per_iter=16)
    dapo = method_cell(cfg, "dapo", "r").config.ppo
    assert (dapo.prompts_per_iter, dapo.keep_groups) == (4, 2)   # oversampling factor kept
    orpo = method_cell(cfg, "orpo", "r").config
    assert orpo.optim.learning_rate == 1e-3 and orpo.loss == "orpo"


# --------------------------------------------------------------------------- bandit
def test_bandit_reinforce_pp_reaches_the_kl_regularised_optimum():
    """REINFORCE++ (k1 in the reward, batch-normalised returns, clipped ratio) on the one-step
    bandit reaches π*(y) ∝ π_SFT(y)·exp(r(y)/β): the batch mean is a baseline and the std a
    positive scale, neither moves the stationary point (beyond the 1/64 self-inclusion)."""
    beta = 0.5
    hp = reinforce_pp_hparams(kl_coef=beta, no_eos_penalty=0.0, epochs=2, minibatches=2)
    pi, pi_ref, table = run_bandit(hp, iters=60, learning_rate=5e-2)
    target = kl_regularised_optimum(pi_ref, table, beta)
    assert tv(pi, target) < 0.05, (pi.round(3), target.round(3))
    assert tv(pi_ref, target) > 0.2


# --------------------------------------------------------------------------- DAPO bandit + resume
def test_dapo_bandit_and_bit_exact_resume(tmp_path):
    """DAPO on the one-step bandit (16 groups of 4 sampled, 8 kept; no KL): the policy goes to the
    best token, and dynamic sampling stops filling its 8 slots as groups become unanimous. (Every
    one-hot policy is a fixed point of DAPO — unanimous groups are dropped, nothing moves it — so
    the arm it ends on depends on the step size: at learning rate 3e-2 this model locks onto token
    1, reward 0.2; at 2e-2 it reaches the best.) The
    same compiled iteration, through ``loop.fit``: 3 iterations equal 2, a restore from the
    checkpoint into a fresh state, and 1 more — metrics and parameters bit for bit. (Resume of the
    other shape classes: GRPO's groups — GSPO's shapes — and PPO's single samples — REINFORCE++'s
    — in test_experiments.py.)"""
    from test_ppo import BANDIT_TABLE, BANDIT_VOCAB, _state, table_reward

    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.loop import fit, resume
    from rlhf_jax.models import create_model, preset
    from rlhf_jax.rl.ppo import Models, make_iteration
    from rlhf_jax.runs import RunDir
    from rlhf_jax.train import OptimConfig

    hp, iters, key = dapo_hparams(no_eos_penalty=0.0, overlong_buffer=0), 60, jax.random.key(1)
    policy, params = create_model(preset("test", vocab_size=BANDIT_VOCAB, max_len=4, n_layers=1),
                                  jax.random.key(0))
    params["wte"]["embedding"][...] = params["wte"]["embedding"][...] * 3.0
    models = Models(policy=policy, ref=policy, rm=table_reward, value=None)
    optim = OptimConfig(learning_rate=2e-2, warmup_steps=5, final_lr_frac=0.05, weight_decay=0.0)
    it = jax.jit(make_iteration(models, hp, max_new_tokens=1, eos_id=BANDIT_VOCAB - 1, pad_id=0),
                 donate_argnums=0)
    batch = {"prompts": jnp.ones((hp.prompts_per_iter, 1), jnp.int32),
             "prompt_mask": jnp.ones((hp.prompts_per_iter, 1), jnp.int32),
             "example_ids": jnp.arange(hp.rollout_size)}

    def train(out, steps, every=1):
        run, ckpt = RunDir(out), Checkpointer(out / "checkpoints", async_save=False)
        state, frozen = _state(models, params, None, params,
                               {"table": jnp.asarray(BANDIT_TABLE, jnp.float32)}, hp, optim,
                               iters * hp.epochs * hp.minibatches)
        state = fit(resume(state, ckpt, run, key), lambda st, b, k: it(st, frozen, b, k),
                    lambda s: batch, steps=steps, key=key, run=run, prefix="ppo", log_every=1,
                    checkpoint_every=every, ckpt=ckpt, key_prefix="")
        ckpt.close()
        return jax.device_get(jax.tree.leaves(state)), (out / "metrics.jsonl").read_text(), state

    whole = train(tmp_path / "a", 3)
    train(tmp_path / "b", 2)
    again = train(tmp_path / "b", 3)
    assert again[1] == whole[1]
    for x, y in zip(whole[0], again[0]):
        np.testing.assert_array_equal(x, y)

    _, log, state = train(tmp_path / "a", iters, every=0)
    logits = policy.apply(state.policy.params, batch["prompts"][:1]).logits[0, -1]
    pi = np.asarray(jax.nn.softmax(logits), np.float64)
    fill = [json.loads(r)["rollout/fill_rate"] for r in log.splitlines()]
    assert pi.argmax() == int(np.argmax(BANDIT_TABLE)) and pi.max() > 0.9, pi.round(3)
    assert fill[0] == 1.0 and min(fill[-10:]) < 1.0, fill


def test_grpo_script_takes_a_method():
    from rlhf_jax.scripts import load

    split = load("grpo").split_method
    assert split(["--method", "dapo", "--out", "x"]) == ("dapo", ["--out", "x"])
    assert split(["--out", "x"]) == ("grpo", ["--out", "x"])
    assert split(["--out", "x", "--method=rloo", "--quiet"]) == ("rloo", ["--out", "x", "--quiet"])
    assert split(["--out", "x", "--method", "raft"]) == ("raft", ["--out", "x"])
    with pytest.raises(SystemExit, match="once"):
        split(["--method", "dapo", "--method", "rloo"])
    with pytest.raises(SystemExit, match="reinforce_pp"):
        split(["--method", "nope"])


def test_matched_kl_skips_runs_from_the_base_model():
    """ORPO's trajectory does not start at SFT: it sets no matched KL and has no value there."""
    from rlhf_jax.stages import compare_report as report

    run = lambda kl, start: {"gold": 0.5, "fabrication_rate": 0.1, "win_rate": 0.6, "wins": 3,
                             "ties": 1, "losses": 1, "kl": kl, "time_s": 1.0, "budget": "b",
                             "start": start, "curve": [(0.0, 0.0, 0.4), (kl, 0.5, 0.1)]}
    results = {"dpo": [run(0.8, "sft")], "orpo": [run(0.3, "base")]}
    assert report.matched_kl(results) == 0.8
    agg = report.aggregate(results, 0.4, metrics=("gold",), curve=("gold", "fabrication_rate"))
    assert "gold_at_kl" in agg["dpo"] and "gold_at_kl" not in agg["orpo"]
    table = report.markdown(results, [{"gold": 0.0, "fabrication_rate": 0.4}], 0.4,
                            headline=("gold", "fabrication_rate"), target_source="given")
    assert "| orpo | from the base model | from the base model |" in table
    assert "0.400 nats/seq (given;" in table
