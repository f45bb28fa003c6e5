"""The README's example loss runs and matches a NumPy reference."""

import re
from pathlib import Path

import jax
import numpy as np

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
