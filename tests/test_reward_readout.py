"""The reward model's pooled readouts (a per-token head summed / averaged over the response tokens)
against the NumPy reference forward, padding invariance, and their config checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import references as ref
from rlhf_jax.configs import ConfigError
from rlhf_jax.models import create_model, preset
from rlhf_jax.stages.reward import RewardConfig
from rlhf_jax.stages.reward_model import make_score_fn


def _score(model, params, prompts, prompt_mask, resp, resp_mask, readout):
    score = make_score_fn(model, prompt_len=prompts.shape[1], readout=readout)
    return np.asarray(score(params, jnp.concatenate([prompts, resp], 1),
                            jnp.concatenate([prompt_mask, resp_mask], 1)))


@pytest.fixture(scope="module")
def rm():
    cfg = preset("test")
    model, params = create_model(cfg, jax.random.key(5), heads=("reward",))
    return cfg, model, params


def test_pooled_readout_matches_numpy_reference(rm):
    """Sum / mean of the reference forward's per-token head over exactly the real response tokens
    (left-padded prompts, right-padded responses of different lengths, one empty response)."""
    cfg, model, params = rm
    rng = np.random.default_rng(1)
    prompts = rng.integers(4, cfg.vocab_size, (4, 4)).astype(np.int32)
    prompt_mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]], np.int32)
    resp = rng.integers(4, cfg.vocab_size, (4, 5)).astype(np.int32)
    resp_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]],
                         np.int32)
    tokens, mask = np.concatenate([prompts, resp], 1), np.concatenate([prompt_mask, resp_mask], 1)
    _, _, scalars = ref.gpt_forward(params, cfg, tokens, mask)
    want_sum = np.array([sum(scalars["reward"][b, 4 + t] for t in range(5) if resp_mask[b, t])
                         for b in range(4)])
    counts = resp_mask.sum(1)
    want_mean = np.where(counts > 0, want_sum / np.maximum(counts, 1), 0.0)
    got_sum = _score(model, params, prompts, prompt_mask, resp, resp_mask, "sum")
    got_mean = _score(model, params, prompts, prompt_mask, resp, resp_mask, "mean")
    np.testing.assert_allclose(got_sum, want_sum, atol=1e-4)
    np.testing.assert_allclose(got_mean, want_mean, atol=1e-4)
    assert got_sum[3] == 0.0 and got_mean[3] == 0.0
    # not the last-token readout: the pooled score of a multi-token response differs from it
    last = _score(model, params, prompts, prompt_mask, resp, resp_mask, "last")
    assert np.abs(last[:3] - got_sum[:3]).min() > 1e-3


@pytest.mark.parametrize("readout", ["sum", "mean"])
def test_pooled_readout_padded_equals_unpadded(rm, readout):
    """More left padding on the prompt and more right padding (with junk ids) on the response
    leave the pooled score unchanged."""
    _, model, params = rm
    prompt, resp = jnp.array([[1, 5, 6, 7]]), jnp.array([[8, 9, 2]])
    base = _score(model, params, prompt, jnp.ones_like(prompt), resp, jnp.ones_like(resp), readout)
    p2, r2 = jnp.array([[0, 0, 1, 5, 6, 7]]), jnp.array([[8, 9, 2, 11, 13]])
    padded = _score(model, params, p2, jnp.array([[0, 0, 1, 1, 1, 1]]), r2,
                    jnp.array([[1, 1, 1, 0, 0]]), readout)
    np.testing.assert_allclose(padded, base, atol=1e-5)


def test_readout_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="readout"):
        RewardConfig(readout="first")
    with pytest.raises(ConfigError, match="readout.*no-lm-readout"):
        RewardConfig(readout="sum", lm_readout=True)
    assert RewardConfig().readout == "last"   # the facts task's default is unchanged
    with pytest.raises(ValueError, match="readout"):
        make_score_fn(None, prompt_len=2, readout="sum", lm_coef_head="coef")
