"""Truncated importance sampling against a NumPy reference, and bf16 PPO's exact zero KL at
iteration 0 (policy = reference parameters, same code path)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.configs import ConfigError
from rlhf_jax.losses.policy_gradient import reinforce_loss, tis_weights
from rlhf_jax.losses.ppo import clipped_policy_loss
from rlhf_jax.models import create_model, preset
from rlhf_jax.ops import KL_ESTIMATORS, kl_per_token
from rlhf_jax.precision import FORCE_ENV
from rlhf_jax.rl.ppo import Frozen, Models, PPOHParams, PPOState, make_iteration
from rlhf_jax.rl.kl_control import RunningMoments
from rlhf_jax.stages.ppo import PPOConfig, Upstream, build_models, with_precision
from rlhf_jax.stages.reward_model import make_score_fn
from rlhf_jax.train import OptimConfig, TrainState, make_optimizer

# a 5-armed bandit: trainer π = softmax(θ), sampler q = softmax(θ / 1.8) (a hotter sampler)
THETA = np.array([2.0, 0.5, -0.5, 1.0, -1.5])
REWARD = np.array([1.0, -0.5, 2.0, 0.0, 3.0])
SAMPLER_TEMPERATURE = 1.8


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def expected_gradient(q, pi, weights):
    """NumPy: E_{y~q}[w(y)·r(y)·∇_θ log π(y)] = Σ_y q_y w_y r_y (e_y − π)."""
    return sum(q[y] * weights[y] * REWARD[y] * (np.eye(len(pi))[y] - pi) for y in range(len(pi)))


@pytest.mark.parametrize("loss_fn", [clipped_policy_loss, reinforce_loss])
def test_tis_removes_the_sampler_bias_of_a_bandit(loss_fn):
    """Tokens drawn by a sampler at another temperature than the trainer: the policy gradient of
    the loss is E_q[r ∇log π] (biased; NumPy), with TIS weights min(π/q, C) it is
    E_q[min(π/q, C) r ∇log π], which for C ≥ max π/q is the trainer's own E_π[r ∇log π]."""
    pi, q = _softmax(THETA), _softmax(THETA / SAMPLER_TEMPERATURE)
    true = expected_gradient(pi, pi, np.ones(5))
    biased = expected_gradient(q, pi, np.ones(5))
    n = 200_000
    y = np.random.default_rng(0).choice(5, size=(n, 1), p=q)
    q_hat = np.bincount(y[:, 0], minlength=5) / n            # the sample's own frequencies
    sampler_logp = jnp.asarray(np.log(q)[y], jnp.float32)
    mask = jnp.ones((n, 1), jnp.float32)
    adv = jnp.asarray(REWARD[y], jnp.float32)

    def policy_gradient(cap):
        theta = jnp.asarray(THETA, jnp.float32)
        old_logp = jax.nn.log_softmax(theta)[y]
        w = None if cap is None else tis_weights(old_logp, sampler_logp, cap=cap)

        def loss(theta):
            logp = jax.nn.log_softmax(theta)[y]
            return loss_fn(logp, old_logp, adv, mask, clip_eps=0.2, weights=w)[0]
        return -np.asarray(jax.grad(loss)(theta), np.float64)

    ratio = pi / q
    assert ratio.max() < 10.0                                  # cap 10 truncates nothing here
    grads = {}
    for cap in (None, 1.0, 10.0):
        w = np.ones(5) if cap is None else np.minimum(ratio, cap)
        # 5 standard errors of the mean of the per-sample gradients w·r·(e_y − π)
        per_sample = (w * REWARD)[y[:, 0], None] * (np.eye(5)[y[:, 0]] - pi)
        tol = 5 * per_sample.std(0).max() / np.sqrt(n)
        g = grads[cap] = policy_gradient(cap)
        # the NumPy expectation over the drawn sample (float32 sums of 2e5 terms: ~1e-4) …
        np.testing.assert_allclose(g, expected_gradient(q_hat, pi, w), atol=1e-3)
        # … and within sampling error of the population's
        np.testing.assert_allclose(g, expected_gradient(q, pi, w), atol=tol)
        if cap == 10.0:                                        # untruncated: the trainer's
            np.testing.assert_allclose(g, true, atol=tol)
        else:                                                  # biased without TIS or with C=1
            assert np.abs(g - true).max() > 4 * tol, (cap, g - true, tol)
    assert np.abs(biased - true).max() > np.abs(grads[1.0] - true).max() > 0


def test_tis_weights_hand_worked():
    t = jnp.log(jnp.array([[0.5, 0.2, 0.9]]))
    s = jnp.log(jnp.array([[0.25, 0.4, 0.1]]))
    np.testing.assert_allclose(tis_weights(t, s, cap=2.0), [[2.0, 0.5, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(tis_weights(t, s, cap=10.0), [[2.0, 0.5, 9.0]], rtol=1e-5)
    assert float(jnp.sum(jax.grad(lambda x: jnp.sum(tis_weights(x, s, cap=10.0)))(t))) == 0.0


def test_tis_needs_the_trainer_recompute():
    with pytest.raises(ConfigError, match="tis_cap"):
        PPOHParams(tis_cap=2.0, rescore_policy=False)
    assert PPOHParams().tis_cap == 0.0                        # off by default


# (reward-side, loss-side): the two things a KL reads, the full-vocabulary logits (exact) and the
# sampled tokens' log-probs (k3; k1 and k2 vanish exactly where k3 does: equal log-probs), in one
# compiled iteration; every estimator vanishes on equal inputs
# (test_kl_estimators_vanish_on_equal_inputs)
KL_CASES = [("exact", "k3")]


@pytest.fixture(scope="module")
def bf16_setup():
    """A tiny bf16 policy = reference (same parameters), an RM and a separate value model."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FORCE_ENV, "1")   # tiny shapes: fine on CPUs without native bf16 too
        cfg = preset("test", vocab_size=16, max_len=16, n_layers=1, precision="bf16")
        policy, params = create_model(cfg, jax.random.key(1))
        rm, rm_params = create_model(cfg, jax.random.key(3), heads=("reward",))
        value, v_params = create_model(cfg, jax.random.key(4), heads=("value",))
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, 16, (8, 5)), jnp.int32)
    models = Models(policy=policy, ref=policy, rm=make_score_fn(rm, prompt_len=5), value=value)
    return models, params, rm_params, v_params, prompts


@pytest.mark.parametrize("kl_estimator, kl_in_loss", KL_CASES)
def test_bf16_kl_is_exactly_zero_at_iteration_0(bf16_setup, kl_estimator, kl_in_loss):
    """bf16 PPO with the policy at the reference's parameters: the KLs (exact in the reward, k3 in
    the loss, and the logged per-token and exact ones) are exactly 0, and so is π_old's distance to
    the trainer's first-update log-probs (ratio 1) — the reference runs the policy's code path."""
    models, params, rm_params, v_params, prompts = bf16_setup
    assert models.policy.cfg.precision == "bf16"
    hp = PPOHParams(prompts_per_iter=8, epochs=1, minibatches=1, kl_coef=0.1,
                    kl_estimator=kl_estimator, kl_in_loss=kl_in_loss, tis_cap=2.0)
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0)
    copy = lambda t: jax.tree.map(lambda x: x.copy(), t)  # noqa: E731
    state = PPOState(policy=TrainState.create(copy(params), make_optimizer(optim, 1)),
                     value=TrainState.create(copy(v_params), make_optimizer(optim, 1)),
                     kl_coef=jnp.asarray(0.1, jnp.float32), reward_moments=RunningMoments.create(),
                     step=jnp.zeros((), jnp.int32))
    it = jax.jit(make_iteration(models, hp, max_new_tokens=6, eos_id=2, pad_id=0))
    batch = {"prompts": prompts, "prompt_mask": jnp.ones_like(prompts),
             "example_ids": jnp.arange(8)}
    _, m, _ = it(state, Frozen(ref=params, rm=rm_params), batch, jax.random.key(0))
    m = {k: float(v) for k, v in m.items()}
    for k in ("kl/per_token", "kl/per_sequence", "kl/exact_per_sequence", "train/kl_loss",
              "train/approx_kl"):
        assert m[k] == 0.0, (k, m[k])
    assert m["train/ratio"] == 1.0
    # the sampler's cached bf16 decoding is not bitwise the forward pass: the mismatch metrics
    assert 0.0 <= m["rollout/logprob_mean_diff"] <= m["rollout/logprob_max_diff"] < 0.5
    assert 0.0 < m["rollout/tis_weight"] <= 2.0


def test_kl_estimators_vanish_on_equal_inputs():
    """Every estimator is exactly 0 when the policy's and reference's logits are the same
    arrays (the premise of the iteration-0 test)."""
    logits = jax.random.normal(jax.random.key(0), (3, 4, 7)).astype(jnp.bfloat16).astype(
        jnp.float32)
    logp = jax.nn.log_softmax(logits)[..., 0]
    for est in KL_ESTIMATORS:
        kl = kl_per_token(logp, logp, estimator=est, logits=logits, ref_logits=logits,
                          old_logp=logp)
        assert float(jnp.abs(kl).max()) == 0.0, est


def test_precision_override_builds_every_model_alike():
    """``PPOConfig.precision`` reaches the reference (``with_precision``) and through it the policy
    and value model; bf16 refuses the sampler's log-probs as π_old."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FORCE_ENV, "1")
        ref, _ = create_model(preset("test"), jax.random.key(0))
        ref16 = with_precision(ref, "bf16")
        assert with_precision(ref, "") is ref and ref16.cfg.precision == "bf16"
        up = Upstream(*([None] * 4), ref=ref16, **dict.fromkeys(
            ("sft_params", "score", "rm_params", "gain", "bias")))
        models = build_models(up, PPOHParams())
        assert models.policy == models.ref == ref16
        assert models.value.cfg == ref16.cfg and models.value.heads == ("value",)
        with pytest.raises(ConfigError, match="rescore_policy"):
            build_models(up, PPOHParams(rescore_policy=False))
        assert build_models(dataclasses.replace(up, ref=ref), PPOHParams(rescore_policy=False))
    with pytest.raises(ConfigError, match="precision"):
        PPOConfig(precision="fp16")
