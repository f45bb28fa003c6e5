"""The README's example loss runs and matches a NumPy reference."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_loss_example_matches_numpy():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing a new loss"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = rng.integers(0, 2, size=(2, 5)).astype(np.float32)
    loss, metrics = jax.jit(lambda a, b, c: scope["unlikelihood_loss"](a, b, c, alpha=0.5))(
        logits, targets, mask)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    pt = np.take_along_axis(p, targets[..., None], -1)[..., 0]
    ref = -0.5 * (np.log1p(-pt) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert float(metrics["unlikelihood"]) == float(loss)


def _hinge_block() -> dict:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### A new preference loss, end to end"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(code, scope)
    return scope


def test_readme_preference_loss_example_matches_numpy_through_the_kwise_path():
    from rlhf_jax.losses.preference import PREFERENCE_LOSSES, kwise_preference_loss
    from rlhf_jax.stages.offline import OfflineConfig

    try:
        _hinge_block()
        rng = np.random.default_rng(1)
        p, k = 3, 4
        logps = rng.normal(-10, 2, size=(p, k)).astype(np.float32)
        ref = rng.normal(-10, 2, size=(p, k)).astype(np.float32)
        ranking = np.array([[3, 1, 2, 0], [1, 1, 0, 2], [0, 2, 1, 1]], np.float32)  # ties drop
        lengths = np.full((p, k), 5.0, np.float32)
        loss, m = jax.jit(lambda a, b, c, d: kwise_preference_loss(
            "hinge", a, b, c, d, beta=0.3, delta=1.0))(logps, ref, lengths, ranking)
        num = den = 0.0
        for i in range(p):
            pairs = [(a, b) for a in range(k) for b in range(k) if ranking[i, a] > ranking[i, b]]
            for a, b in pairs:
                h = (logps[i, a] - ref[i, a]) - (logps[i, b] - ref[i, b])
                num += max(0.0, 1.0 - 0.3 * h) / len(pairs)
            den += 1.0
        np.testing.assert_allclose(float(loss), num / den, rtol=1e-5)
        assert float(m["pairs"]) == 6 + 5 + 5
        cfg = OfflineConfig(loss="hinge", loss_args={"beta": 0.3, "delta": 1.0})
        assert cfg.loss_hparams() == {"beta": 0.3, "delta": 1.0}
        # the config refuses, before anything runs, what the loss would refuse at its first step
        from rlhf_jax.configs import ConfigError
        for kw, field in (({"beta": 0.3}, "loss_args.beta"),   # `beta` is not passed to it
                          ({"loss_args": {"beta": 0.3, "delt": 1.0}}, "loss_args.delt")):
            with pytest.raises(ConfigError, match=field):
                OfflineConfig(loss="hinge", **kw)
    finally:
        PREFERENCE_LOSSES.pop("hinge", None)
