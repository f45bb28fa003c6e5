"""The compiled PPO iteration: equal to its pieces run one by one, and right on a one-step bandit."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references

from rlhf_jax.losses.ppo import clipped_policy_loss, clipped_value_loss
from rlhf_jax.models import create_model, preset
from rlhf_jax.losses.reward import reward_at_last_token
from rlhf_jax.ops import token_logprobs
from rlhf_jax.rl.advantages import gae, token_rewards, whiten
from rlhf_jax.rl.kl_control import RunningMoments
from rlhf_jax.rl.ppo import Frozen, Models, PPOHParams, PPOState, make_iteration
from rlhf_jax.rl.rollout import collect
from rlhf_jax.sampling import SamplingConfig, response_logits
from rlhf_jax.stages.reward_model import make_score_fn
from rlhf_jax.train import OptimConfig, TrainState, make_optimizer


def table_reward(params, tokens, mask):
    """A reward model that is a lookup table over the last token: r(y) = table[y]."""
    return reward_at_last_token(params["table"][tokens], mask)


def _state(models, policy_params, value_params, ref_params, rm_params, hp, optim, updates):
    """``(state, frozen)`` with copies of the parameters (the iteration donates its state)."""
    copy = lambda t: jax.tree.map(lambda x: x.copy(), t)  # noqa: E731
    value = None if value_params is None else TrainState.create(
        copy(value_params), make_optimizer(optim, updates))
    return (PPOState(policy=TrainState.create(copy(policy_params), make_optimizer(optim, updates)),
                     value=value, kl_coef=jnp.asarray(hp.kl_coef, jnp.float32),
                     reward_moments=RunningMoments.create(), step=jnp.zeros((), jnp.int32)),
            Frozen(ref=copy(ref_params), rm=copy(rm_params)))


def _setup(vocab=16, prompt_len=5, b=8):
    cfg = preset("test", vocab_size=vocab, max_len=16, n_layers=1)
    policy, p_params = create_model(cfg, jax.random.key(1))
    _, ref_params = create_model(cfg, jax.random.key(2))
    rm, rm_params = create_model(cfg, jax.random.key(3), heads=("reward",))
    value, v_params = create_model(cfg, jax.random.key(4), heads=("value",))
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, vocab, (b, prompt_len)).astype(np.int32)
    lengths = rng.integers(1, prompt_len + 1, b)
    mask = (np.arange(prompt_len)[None] >= prompt_len - lengths[:, None]).astype(np.int32)
    prompts = np.where(mask, prompts, 0)
    score = make_score_fn(rm, prompt_len=prompt_len)
    return (Models(policy=policy, ref=policy, rm=score, value=value), p_params, ref_params,
            rm_params, v_params, jnp.asarray(prompts), jnp.asarray(mask))


def _masked_mean(x, m):
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _pieces(models, hp, state, frozen, batch, key, *, n_new, eos, pad, gain, bias):
    """The same iteration written out step by step in Python (independent of ``make_iteration``):
    the rollout, GAE and the clipped losses from the library; the entropy bonus, the loss-side KL
    (k2 or exact), the shared critic's value term and the ptx term written out here."""
    k_sample, k_perm = jax.random.split(key)
    pol, val = state.policy, state.value
    shared = hp.critic == "shared"
    t = hp.temperature
    ro = jax.jit(lambda: collect(   # compiled as a whole: eager op-by-op costs 10 s
        models.policy, pol.params, models.ref, frozen.ref, models.rm, frozen.rm,
        None if shared else models.value, None if shared else val.params,
        batch["prompts"], batch["prompt_mask"], k_sample, batch["example_ids"],
        sampling=SamplingConfig(max_new_tokens=n_new, temperature=t),
        eos_id=eos, pad_id=pad, rescore_policy=hp.rescore_policy, shared_critic=shared))()
    mask = ro.mask.astype(jnp.float32)
    score = ro.scores * gain + bias - hp.no_eos_penalty * ro.truncated
    beta = 0.0 if hp.kl_in_loss else hp.kl_coef
    rewards = token_rewards(score, ro.logp - ro.ref_logp, mask, kl_coef=beta)
    adv, ret = gae(rewards, ro.values, mask, discount=hp.discount, gae_lambda=hp.gae_lambda)
    raw = np.asarray(adv)[np.asarray(mask) > 0]
    adv_scale = float(np.sqrt(raw.var() + 1e-8))
    adv = whiten(adv, mask)
    # truncated importance weights min(π_old / π_sampler, C) (all C when C < 1 in float32)
    tis = jnp.minimum(jnp.exp(ro.logp - ro.sampler_logp), hp.tis_cap) if hp.tis_cap else None
    ref_logits = response_logits(models.ref, frozen.ref, batch["prompts"], batch["prompt_mask"],
                                 ro.responses, ro.mask)[0] / t
    n = mask.shape[0]
    mb = n // hp.minibatches
    big = hp.minibatches   # rows go to minibatches in blocks of consecutive example ids
    ids = np.asarray(batch["example_ids"])

    def pl(params, i, u):
        logits, out = response_logits(models.policy, params, batch["prompts"][i],
                                      batch["prompt_mask"][i], ro.responses[i], ro.mask[i])
        logits = logits / t
        logp = token_logprobs(logits, ro.responses[i])
        loss = clipped_policy_loss(logp, ro.logp[i], adv[i], mask[i], clip_eps=hp.clip_eps,
                                   weights=None if tis is None else tis[i])[0]
        lp = jax.nn.log_softmax(logits)
        loss -= hp.entropy_coef * _masked_mean(-jnp.sum(jnp.exp(lp) * lp, -1), mask[i])
        if hp.kl_in_loss == "k2":
            kl = 0.5 * jnp.square(ro.ref_logp[i] - logp)
        elif hp.kl_in_loss == "exact":
            lq = jax.nn.log_softmax(ref_logits[i])
            kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
        if hp.kl_in_loss:
            loss += hp.kl_coef * _masked_mean(kl, mask[i]) / adv_scale
        if shared:
            loss += hp.vf_coef * clipped_value_loss(
                out.scalars["value"], ro.values[i], ret[i], mask[i],
                clip_eps=hp.value_clip_eps)[0]
        if hp.ptx_coef:
            rows = {k: v[u] for k, v in batch["ptx"].items()}
            o = models.policy.apply(params, rows["tokens"], attention_mask=rows["attention_mask"])
            nll = -token_logprobs(o.logits[:, :-1], rows["tokens"][:, 1:])
            loss += hp.ptx_coef * _masked_mean(nll, rows["loss_mask"][:, 1:])
        return loss

    def vl(params, i):
        _, out = response_logits(models.value, params, batch["prompts"][i],
                                 batch["prompt_mask"][i], ro.responses[i], ro.mask[i],
                                 compute_logits=False)
        return clipped_value_loss(out.scalars["value"], ro.values[i], ret[i], mask[i],
                                  clip_eps=hp.value_clip_eps)[0]

    # one optimiser step per minibatch, each compiled once (the same steps as eager, up to
    # float rounding)
    policy_step = jax.jit(lambda s, i, u: s.apply_gradients(jax.grad(pl)(s.params, i, u)))
    value_step = jax.jit(lambda s, i: s.apply_gradients(jax.grad(vl)(s.params, i)))
    u = 0
    for ek in jax.random.split(k_perm, hp.epochs):
        assign = np.array([int(jax.random.permutation(jax.random.fold_in(ek, int(r) // big),
                                                      big)[int(r) % big]) for r in ids])
        for m in range(hp.minibatches):
            i = np.flatnonzero(assign == m)
            assert len(i) == mb
            pol = policy_step(pol, i, u)
            if not shared:
                val = value_step(val, i)
            u += 1
    return pol, val, ro


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_rollout_scored_from_the_sampler_equals_the_rescored_rollout(critic):
    """``rescore_policy=False`` (the sampler's own logits, TRL's way) gives the rollout of a full
    policy forward pass: same tokens, and log-probs, exact KL, entropy and shared-trunk values
    equal up to float rounding."""
    models, p_params, ref_params, rm_params, v_params, prompts, pmask = _setup()
    policy = models.policy
    value, vparams = models.value, v_params
    if critic == "shared":
        policy, p_params = create_model(policy.cfg, jax.random.key(1), heads=("value",))
        value, vparams = None, None
    run = jax.jit(lambda rescore: collect(
        policy, p_params, models.ref, ref_params, models.rm, rm_params, value, vparams, prompts,
        pmask, jax.random.key(1), jnp.arange(8), eos_id=2, pad_id=0, rescore_policy=rescore,
        shared_critic=critic == "shared",
        sampling=SamplingConfig(max_new_tokens=6, temperature=0.8)), static_argnums=0)
    a, b = run(True), run(False)
    np.testing.assert_array_equal(a.responses, b.responses)
    assert 0 < int(a.mask.sum()) < a.mask.size      # EOS inside the budget for some rows
    for f in ("logp", "ref_logp", "exact_kl", "entropy", "values", "scores", "sampler_logp"):
        np.testing.assert_allclose(getattr(b, f), getattr(a, f), atol=1e-5, err_msg=f)


BRANCHES = {   # name: PPOHParams overrides
    "default": dict(),
    # TIS with C = 0.5 halves the policy term against the shared critic's value term
    "shared_critic+entropy+k2_in_loss+tis": dict(critic="shared", entropy_coef=0.05,
                                                 kl_in_loss="k2", kl_coef=0.3, tis_cap=0.5),
    "ptx+exact_in_loss+sampler_logits": dict(ptx_coef=0.3, kl_in_loss="exact", kl_coef=0.3,
                                             rescore_policy=False),
}


@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_compiled_iteration_equals_its_pieces(branch):
    """Parameters after one iteration (2 epochs × 2 minibatches) equal the written-out pieces, for
    the default iteration, the shared critic with an entropy bonus, k2 in the loss and truncated
    importance weights, and PPO-ptx with the exact KL in the loss and π_old from the sampler's
    logits; the rollout's diagnostics equal NumPy references from the logits."""
    models, p_params, ref_params, rm_params, v_params, prompts, pmask = _setup()
    hp = PPOHParams(**{**dict(prompts_per_iter=8, epochs=2, minibatches=2, kl_coef=0.1,
                              no_eos_penalty=0.5), **BRANCHES[branch]})
    if hp.critic == "shared":
        policy, p_params = create_model(models.policy.cfg, jax.random.key(1), heads=("value",))
        models = Models(policy=policy, ref=models.ref, rm=models.rm, value=None)
        v_params = None
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0)
    kw = dict(n_new=6, eos=2, pad=0, gain=1.5, bias=-0.2)
    batch = {"prompts": prompts, "prompt_mask": pmask, "example_ids": jnp.arange(8)}
    if hp.ptx_coef:
        rng = np.random.default_rng(5)
        tok = rng.integers(3, 16, (4, 3, 9)).astype(np.int32)
        am = (np.arange(9)[None, None] < rng.integers(3, 10, (4, 3))[..., None]).astype(np.int32)
        batch["ptx"] = {"tokens": jnp.asarray(tok * am), "attention_mask": jnp.asarray(am),
                        "loss_mask": jnp.asarray(am)}
    key = jax.random.key(7)

    state, frozen = _state(models, p_params, v_params, ref_params, rm_params, hp, optim, 4)
    pol, val, ro = _pieces(models, hp, state, frozen, batch, key, **kw)

    it = jax.jit(make_iteration(models, hp, max_new_tokens=6, eos_id=2, pad_id=0, rm_gain=1.5,
                                rm_bias=-0.2), donate_argnums=0)
    state, frozen = _state(models, p_params, v_params, ref_params, rm_params, hp, optim, 4)
    new, metrics, rollout = it(state, frozen, batch, key)

    np.testing.assert_array_equal(np.asarray(rollout["responses"]), np.asarray(ro.responses))
    pairs = [(new.policy.params, pol.params)]
    if hp.critic == "separate":
        pairs.append((new.value.params, val.params))
    for a, b in pairs:
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), a, b)
    assert int(new.policy.step) == 4 and int(new.step) == 1
    assert set(metrics) >= {"train/loss", "kl/per_sequence", "rollout/rm_score"}
    assert all(np.shape(v) == () for v in metrics.values()), "metrics are a flat dict of scalars"
    assert ("train/entropy" in metrics and ("train/kl_loss" in metrics) == bool(hp.kl_in_loss)
            and ("train/ptx_loss" in metrics) == bool(hp.ptx_coef))
    assert float(metrics["rollout/logprob_max_diff"]) <= 1e-5
    assert 0 <= float(metrics["rollout/logprob_mean_diff"]) <= float(
        metrics["rollout/logprob_max_diff"])
    if hp.tis_cap:
        assert float(metrics["rollout/tis_weight"]) == hp.tis_cap
    # diagnostics against NumPy references from the rollout's own logits
    m = np.asarray(ro.mask, bool)
    logits = np.asarray(response_logits(models.policy, p_params, prompts, pmask, ro.responses,
                                        ro.mask)[0], np.float64) / hp.temperature
    ref_logits = np.asarray(response_logits(models.ref, ref_params, prompts, pmask, ro.responses,
                                            ro.mask)[0], np.float64) / hp.temperature
    lp, lq = references.log_softmax(logits), references.log_softmax(ref_logits)
    k1 = references.token_logprobs(logits, ro.responses) - references.token_logprobs(
        ref_logits, ro.responses)
    exact = np.sum(np.exp(lp) * (lp - lq), -1)
    np.testing.assert_allclose(float(metrics["kl/per_sequence"]), (k1 * m).sum(-1).mean(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(metrics["kl/exact_per_sequence"]),
                               (exact * m).sum(-1).mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(metrics["rollout/entropy"]),
                               references.masked_mean(references.entropy(logits), m),
                               rtol=1e-4, atol=1e-6)
    # the KL's two parts: k1 = (−log π_SFT) − (−log π)
    np.testing.assert_allclose(
        float(metrics["kl/cross_entropy_term"]) - float(metrics["kl/entropy_term"]),
        float(metrics["kl/per_token"]), rtol=1e-4, atol=1e-6)
    assert np.isfinite([float(v) for v in metrics.values()]).all()


BANDIT_VOCAB, BANDIT_TABLE = 6, (0.0, 0.2, -0.5, 0.3, 1.0, -1.0)


def run_bandit(hp: PPOHParams, *, iters: int = 150, learning_rate: float = 2e-2):
    """A one-step bandit on the compiled iteration: one prompt (``hp.prompts_per_iter`` copies,
    ``group_size`` samples each), one response token from a vocabulary of 6 with reward
    ``BANDIT_TABLE[y]``. Returns ``(π after training, π_SFT, rewards)`` as float64 arrays."""
    vocab = BANDIT_VOCAB
    cfg = preset("test", vocab_size=vocab, max_len=4, n_layers=1)
    policy, params = create_model(cfg, jax.random.key(0))
    # a non-uniform reference policy
    params["wte"]["embedding"][...] = params["wte"]["embedding"][...] * 3.0
    n = hp.prompts_per_iter
    prompt = jnp.ones((n, 1), jnp.int32)
    pmask = jnp.ones((n, 1), jnp.int32)
    pi_ref = np.asarray(jax.nn.softmax(policy.apply(params, prompt[:1]).logits[0, -1]), np.float64)
    assert pi_ref.max() - pi_ref.min() > 0.05
    table = jnp.asarray(BANDIT_TABLE, jnp.float32)
    optim = OptimConfig(learning_rate=learning_rate, warmup_steps=5, final_lr_frac=0.05,
                        weight_decay=0.0)
    models = Models(policy=policy, ref=policy, rm=table_reward, value=None)
    state, frozen = _state(models, params, None, params, {"table": table}, hp, optim,
                           iters * hp.epochs * hp.minibatches)
    it = jax.jit(make_iteration(models, hp, max_new_tokens=1, eos_id=vocab - 1, pad_id=0),
                 donate_argnums=0)
    batch = {"prompts": prompt, "prompt_mask": pmask, "example_ids": jnp.arange(hp.rollout_size)}
    for i in range(iters):
        state, _, _ = it(state, frozen, batch, jax.random.fold_in(jax.random.key(1), i))
    pi = np.asarray(jax.nn.softmax(policy.apply(state.policy.params, prompt[:1]).logits[0, -1]),
                    np.float64)
    return pi, pi_ref, np.asarray(BANDIT_TABLE, np.float64)


def kl_regularised_optimum(pi_ref, rewards, beta):
    """π*(y) ∝ π_SFT(y)·exp(r(y)/β), the maximiser of E_π[r] − β·KL(π ‖ π_SFT)."""
    target = pi_ref * np.exp(rewards / beta)
    return target / target.sum()


def tv(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


@pytest.mark.parametrize("kl_estimator, kl_in_loss", [("k1", ""), ("exact", ""), ("k1", "k2")])
def test_one_step_bandit_reaches_the_kl_regularised_optimum(kl_estimator, kl_in_loss):
    """One prompt, one response token from a vocabulary of 6: with reward r(y) and a KL penalty
    of weight β (in the reward: k1 or exact; or in the loss: k2), the optimum is
    π*(y) ∝ π_SFT(y)·exp(r(y)/β)."""
    beta = 0.5
    hp = PPOHParams(prompts_per_iter=64, epochs=2, minibatches=2, kl_coef=beta,
                    kl_estimator=kl_estimator, kl_in_loss=kl_in_loss, critic="none", no_eos_penalty=0.0)
    pi, pi_ref, table = run_bandit(hp)
    target = kl_regularised_optimum(pi_ref, table, beta)
    assert tv(pi, target) < 0.05, (pi.round(3), target.round(3))
    assert tv(pi_ref, target) > 0.2   # the test is not passed by standing still


def test_kl_stop_rule_averages_the_last_rollouts_and_seeds_a_resumed_window(tmp_path):
    from rlhf_jax.configs import ConfigError
    from rlhf_jax.runs import RunDir
    from rlhf_jax.stages.ppo import PPOConfig, kl_stop_rule

    assert kl_stop_rule(PPOConfig(), RunDir(tmp_path / "off")) is None
    cfg = PPOConfig(kl_stop=2.0, kl_stop_window=2)
    kls = [1.0, 2.5, 1.4, 2.7, 9.0]      # means of the last two: -, 1.75, 1.95, 2.05
    rule = kl_stop_rule(cfg, RunDir(tmp_path / "a"))
    fired = [rule(i + 1, {"kl/exact_per_sequence": k}) for i, k in enumerate(kls[:4])]
    assert fired == [False, False, False, True]
    # a run resumed after iteration 3 reads the rows it logged: it fires at the same iteration
    run = RunDir(tmp_path / "b")
    for i, k in enumerate(kls[:3]):
        run.log_metrics(i + 1, {"kl/exact_per_sequence": k})
    assert kl_stop_rule(cfg, run)(4, {"kl/exact_per_sequence": kls[3]}) is True
    with pytest.raises(ConfigError, match="log_every"):
        PPOConfig(kl_stop=2.0, log_every=2)


def test_length_residual_is_the_least_squares_residual_on_length():
    from rlhf_jax.rl.advantages import length_residual

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 25, size=32)
    scores = 0.1 * lengths + rng.normal(size=32)
    out, slope = length_residual(jnp.asarray(scores, jnp.float32), jnp.asarray(lengths))
    b, a = np.polyfit(lengths.astype(np.float64), scores, 1)        # NumPy's least squares
    np.testing.assert_allclose(float(slope), b, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out), scores - b * (lengths - lengths.mean()),
                               atol=1e-5)
    assert abs(np.corrcoef(np.asarray(out), lengths)[0, 1]) < 1e-5   # no length left
    same, slope = length_residual(jnp.asarray(scores, jnp.float32), jnp.full((32,), 7))
    assert float(slope) == 0.0 and np.allclose(np.asarray(same), scores)


def test_a_weak_typed_state_scalar_is_refused_before_compiling():
    """``jnp.asarray(0.1)`` in the state would recompile the iteration on its second call (its
    output is strongly typed): the iteration refuses it while tracing, naming the field."""
    models, p_params, ref_params, rm_params, v_params, prompts, pmask = _setup()
    hp = PPOHParams(prompts_per_iter=8, epochs=1, minibatches=1)
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0)
    state, frozen = _state(models, p_params, v_params, ref_params, rm_params, hp, optim, 1)
    it = jax.jit(make_iteration(models, hp, max_new_tokens=4, eos_id=2, pad_id=0))
    batch = {"prompts": prompts, "prompt_mask": pmask, "example_ids": jnp.arange(8)}
    with pytest.raises(TypeError, match="PPOState.kl_coef is weak-typed"):
        it(state.replace(kl_coef=jnp.asarray(0.1)), frozen, batch, jax.random.key(0))
    with pytest.raises(TypeError, match=r"PPOState.hparams\['clip_eps'\] is weak-typed"):
        it(state.replace(hparams={"clip_eps": jnp.asarray(0.2)}), frozen, batch,
           jax.random.key(0))
