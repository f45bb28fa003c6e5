"""Adaptive entropy control: the update rule by hand, a bandit whose controlled entropy settles at
its target (the coefficient at the analytic fixed point, within its bounds), and the compiled PPO
iteration on the tiny upstream: it logs the controller, follows the rule and resumes bit-exactly."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from rlhf_jax import scripts, tiny
from rlhf_jax.configs import ConfigError
from rlhf_jax.rl.entropy_control import adaptive_entropy_coef
from rlhf_jax.rl.ppo import PPOHParams


def test_update_rule_by_hand():
    step = lambda c, h: float(adaptive_entropy_coef(  # noqa: E731
        jnp.float32(c), jnp.float32(h), target=0.2, lr=0.5, max_coef=0.1))
    assert step(0.02, 0.1) == pytest.approx(0.07)      # below target: 0.02 + 0.5·0.1
    assert step(0.02, 0.26) == pytest.approx(0.0)      # above: 0.02 − 0.03, clipped at 0
    assert step(0.09, 0.0) == pytest.approx(0.1)       # far below: clipped at c_max
    assert step(0.04, 0.2) == pytest.approx(0.04)      # on target: unchanged
    with pytest.raises(ConfigError, match="entropy_coef"):
        PPOHParams(entropy_target=0.2, entropy_coef=0.2, entropy_coef_max=0.1)


R = jnp.array([1.0, 0.5, 0.0, 0.0])   # a 4-armed bandit's rewards


def _entropy(z):
    return -jnp.sum(jax.nn.softmax(z) * jax.nn.log_softmax(z))


@jax.jit
def _controlled(target):
    """Exact gradient ascent on E_π[r] + c·H(π) over softmax logits, the controller updating c
    from each step's entropy; per-step (entropy, coefficient)."""
    def step(carry, _):
        z, c = carry
        h = _entropy(z)
        z = z + jax.grad(lambda z: jnp.sum(jax.nn.softmax(z) * R) + c * _entropy(z))(z)
        return (z, adaptive_entropy_coef(c, h, target=target, lr=0.05, max_coef=0.5)), (h, c)
    return lax.scan(step, (jnp.zeros(4), jnp.zeros(())), None, length=2000)[1]


def _fixed_point(target):
    """c with H(softmax(R / c)) = target (the maximiser of E[r] + c·H), by bisection."""
    lo, hi = 1e-3, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _entropy(R / mid) < target else (lo, mid)
    return lo


@pytest.mark.parametrize("target", [0.3, 0.6, 1.3, 0.0])
def test_bandit_entropy_settles_at_the_target_with_a_bounded_coefficient(target):
    h, c = map(np.asarray, _controlled(target))
    assert (c >= 0).all() and (c <= 0.5).all()
    if target == 1.3:     # out of reach of c_max: the coefficient saturates at its bound
        assert c[-1] == np.float32(0.5)
        assert h[-1] == pytest.approx(float(_entropy(R / 0.5)), abs=1e-4)
    elif target == 0.0:   # the bonus never pushes entropy down: it stays 0, entropy collapses
        assert (c == 0).all() and h[-1] < 0.01
    else:
        assert h[-1] == pytest.approx(target, abs=1e-3)
        assert c[-1] == pytest.approx(_fixed_point(target), rel=0.02)
        assert c[1] > c[0] or h[0] > target   # moves up while entropy is below the target


def test_ppo_iteration_follows_the_rule_and_resumes_bit_exactly(tmp_path):
    """The shared tiny PPO run (4 iterations, checkpoints at 2 and 4) has the controller on: each
    logged coefficient is the rule applied to the previous row, within bounds; losing everything
    after the iteration-2 checkpoint and rerunning gives byte-identical metrics."""
    full = tiny.tiny_run("ppo")
    hp = json.loads((full / "config.json").read_text())["ppo"]
    target, lr, c_max = hp["entropy_target"], hp["entropy_lr"], hp["entropy_coef_max"]
    rows = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    assert target > 0 and rows[0]["entropy/coef"] == hp["entropy_coef"] == 0.0
    for prev, row in zip(rows, rows[1:]):
        assert row["entropy/mean"] == row["rollout/entropy"] and row["entropy/target"] == target
        want = float(adaptive_entropy_coef(jnp.float32(prev["entropy/coef"]),
                                           jnp.float32(prev["entropy/mean"]), target=target,
                                           lr=lr, max_coef=c_max))
        assert row["entropy/coef"] == pytest.approx(want, rel=1e-6)
        assert 0.0 <= row["entropy/coef"] <= np.float32(c_max)
    # the tiny policy's entropy is below the target: the coefficient rises to its bound
    assert 0.0 < rows[1]["entropy/coef"] < rows[2]["entropy/coef"] == pytest.approx(c_max)

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "4")
    shutil.rmtree(cut / "params")
    (cut / "summary.json").unlink()
    scripts.load("ppo").run(tiny.tiny_config("ppo"), cut)
    assert (cut / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
