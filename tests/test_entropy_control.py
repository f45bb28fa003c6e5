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
from rlhf_jax.rl.entropy_control import entropy_control
from rlhf_jax.rl.ppo import PPOHParams


def test_update_rule_by_hand():
    def step(i, h):
        c, i2 = entropy_control(jnp.float32(i), jnp.float32(h), target=0.2, kp=0.5, ki=0.1,
                                max_coef=0.1)
        return float(c), float(i2)
    assert step(0.02, 0.1) == pytest.approx((0.07, 0.03))    # below: 0.02 + 0.5·0.1, + 0.1·0.1
    assert step(0.02, 0.3) == pytest.approx((0.0, 0.01))     # above: 0.02 − 0.05 clipped at 0
    assert step(0.02, 1.0) == pytest.approx((0.0, 0.0))      # integral clipped at 0 too
    assert step(0.09, 0.0) == pytest.approx((0.1, 0.1))      # far below: both clipped at c_max
    assert step(0.04, 0.2) == pytest.approx((0.04, 0.04))    # on target: unchanged
    with pytest.raises(ConfigError, match="entropy_coef"):
        PPOHParams(entropy_target=0.2, entropy_coef=0.2, entropy_coef_max=0.1)


R = jnp.array([1.0, 0.5, 0.0, 0.0])   # a 4-armed bandit's rewards


def _entropy(z):
    return -jnp.sum(jax.nn.softmax(z) * jax.nn.log_softmax(z))


@jax.jit
def _controlled(target, kp):
    """Exact gradient ascent on E_π[r] + c·H(π) over softmax logits, c from the controller on
    each step's entropy (K_i = 0.05, c_max = 0.5); per-step (entropy, coefficient)."""
    def step(carry, _):
        z, i = carry
        h = _entropy(z)
        c, i = entropy_control(i, h, target=target, kp=kp, ki=0.05, max_coef=0.5)
        z = z + jax.grad(lambda z: jnp.sum(jax.nn.softmax(z) * R) + c * _entropy(z))(z)
        return (z, i), (h, c)
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
    h, c = map(np.asarray, _controlled(target, 1.0))
    assert (c >= 0).all() and (c <= 0.5).all()
    if target == 1.3:     # out of reach of c_max: the coefficient saturates at its bound
        assert c[-1] == np.float32(0.5)
        assert h[-1] == pytest.approx(float(_entropy(R / 0.5)), abs=1e-4)
    elif target == 0.0:   # the bonus never pushes entropy down: it stays 0, entropy collapses
        assert (c == 0).all() and h[-1] < 0.03
    else:
        assert h[-1] == pytest.approx(target, abs=1e-3)
        assert c[-1] == pytest.approx(_fixed_point(target), rel=0.02)
        # the integral term alone oscillates about the target; the proportional term damps it
        h_i = np.asarray(_controlled(target, 0.0)[0])
        assert np.abs(h[100:] - target).max() < 0.5 * np.abs(h_i[100:] - target).max()


def test_ppo_iteration_follows_the_rule_and_resumes_bit_exactly(tmp_path):
    """The shared tiny PPO run (4 iterations, checkpoints at 2 and 4) has the controller on: each
    logged coefficient is the rule applied to the previous row, within bounds; losing everything
    after the iteration-2 checkpoint and rerunning gives byte-identical metrics."""
    full = tiny.tiny_run("ppo")
    hp = json.loads((full / "config.json").read_text())["ppo"]
    target, c_max = hp["entropy_target"], np.float32(hp["entropy_coef_max"])
    rows = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    integral = hp["entropy_coef"]
    assert target > 0 and integral == 0.0
    for row in rows:
        assert row["entropy/mean"] == row["rollout/entropy"] and row["entropy/target"] == target
        want = entropy_control(jnp.float32(integral), jnp.float32(row["entropy/mean"]),
                               target=target, kp=hp["entropy_kp"], ki=hp["entropy_ki"],
                               max_coef=hp["entropy_coef_max"])
        assert (row["entropy/coef"], row["entropy/integral"]) == pytest.approx(
            tuple(map(float, want)), rel=1e-6)
        assert 0.0 <= row["entropy/coef"] <= c_max and 0.0 <= row["entropy/integral"] <= c_max
        integral = row["entropy/integral"]
    # the tiny policy's entropy is below the target: the coefficient rises to its bound
    assert 0.0 < rows[0]["entropy/coef"] < rows[1]["entropy/coef"] == pytest.approx(c_max)

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "4")
    shutil.rmtree(cut / "params")
    (cut / "summary.json").unlink()
    scripts.load("ppo").run(tiny.tiny_config("ppo"), cut)
    assert (cut / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    for f in sorted((full / "samples").iterdir()):   # the judged samples of every iteration
        assert (cut / "samples" / f.name).read_text() == f.read_text()
