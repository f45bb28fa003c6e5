"""KTO and ORPO against NumPy references: hand loops on random inputs, masked = sliced, finite
gradients, the stop-gradient reference point, and a split batch under a named axis = one batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.preference import (PREFERENCE_LOSSES, REFERENCE_FREE, kto_loss,
                                        kwise_preference_loss, log1mexp, orpo_loss)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def kto_reference(pol, ref, pol_kl, ref_kl, desirable, mask, kl_mask, *, beta, ld, lu):
    kl = [(a - b) for a, b, m in zip(pol_kl, ref_kl, kl_mask) if m]
    z = max(0.0, float(np.mean(kl)) if kl else 0.0)
    num = den = 0.0
    for p, r0, d, m in zip(pol, ref, desirable, mask):
        r = p - r0
        v = ld * _sigmoid(beta * (r - z)) if d else lu * _sigmoid(beta * (z - r))
        num += m * ((ld if d else lu) - v)
        den += m
    return num / max(den, 1.0), z


def orpo_reference(pc, pr, lc, lr, mask, *, lam):
    num = den = 0.0
    for a, b, la, lb, m in zip(pc, pr, lc, lr, mask):
        ca, cb = min(a / la, -1e-6), min(b / lb, -1e-6)
        odds = (ca - np.log(-np.expm1(ca))) - (cb - np.log(-np.expm1(cb)))
        num += m * (-ca + lam * np.log1p(np.exp(-odds)))
        den += m
    return num / den


def _kto_inputs(seed, b=12):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(-20, 4, size=s).astype(np.float32)  # noqa: E731
    kl = f(b)
    return dict(policy_logps=f(b), ref_logps=f(b), policy_kl_logps=kl,
                ref_kl_logps=kl - 2 + rng.normal(0, 1, b).astype(np.float32),
                desirable=(rng.random(b) < 0.4).astype(np.float32),
                mask=(rng.random(b) < 0.8).astype(np.float32),
                kl_mask=(rng.random(b) < 0.9).astype(np.float32))


@pytest.mark.parametrize("seed,ld,lu", [(0, 1.0, 1.0), (1, 1.0, 1.33), (2, 0.7, 1.0)])
def test_kto_matches_numpy_loop(seed, ld, lu):
    x = _kto_inputs(seed)
    loss, m = jax.jit(functools.partial(kto_loss, beta=0.1, lambda_desirable=ld,
                                        lambda_undesirable=lu))(**x)
    ref, z = kto_reference(*(x[k] for k in ("policy_logps", "ref_logps", "policy_kl_logps",
                                            "ref_kl_logps", "desirable", "mask", "kl_mask")),
                           beta=0.1, ld=ld, lu=lu)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(float(m["kl_ref_point"]), z, rtol=1e-5, atol=1e-6)
    assert z > 0   # the mismatched pairs are 2 nats apart on average: the clamp is not active


def test_kto_reference_point_is_clamped_at_zero_and_not_differentiated():
    x = _kto_inputs(3)
    x["ref_kl_logps"] = x["policy_kl_logps"] + 5.0          # mean log-ratio −5 → z = 0
    _, m = kto_loss(**x, beta=0.1)
    assert float(m["kl_ref_point"]) == 0.0
    x = _kto_inputs(4)
    grads = jax.grad(lambda a, b: kto_loss(**{**x, "policy_logps": a, "policy_kl_logps": b},
                                           beta=0.1)[0], argnums=(0, 1))(
        x["policy_logps"], x["policy_kl_logps"])
    assert np.all(np.isfinite(grads[0])) and np.any(grads[0] != 0)
    np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)   # z is a stop-gradient baseline
    # masked responses get no gradient
    np.testing.assert_array_equal(np.asarray(grads[0])[x["mask"] == 0], 0.0)


def test_kto_masked_equals_sliced():
    x = _kto_inputs(5)
    keep = x["mask"] > 0
    full, _ = kto_loss(**x, beta=0.2)
    # the reference point uses every mismatched pair, so slice only the labelled responses
    sliced, _ = kto_loss(**{k: (v[keep] if k in ("policy_logps", "ref_logps", "desirable")
                                else v) for k, v in x.items() if k != "mask"}, beta=0.2)
    np.testing.assert_allclose(float(full), float(sliced), rtol=1e-6)


def test_kto_split_batch_under_named_axis_equals_one_batch():
    """Two shards reduced over a named axis (vmap stands in for shard_map) = the whole batch;
    the reference point is averaged across shards before the clamp."""
    x = _kto_inputs(6)
    whole, mw = kto_loss(**x, beta=0.1)
    split = {k: v.reshape(2, -1) for k, v in x.items()}
    parts, ms = jax.vmap(functools.partial(kto_loss, beta=0.1, axis_name="d"),
                         axis_name="d")(**split)
    np.testing.assert_allclose(np.asarray(parts), float(whole), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ms["kl_ref_point"]), float(mw["kl_ref_point"]),
                               rtol=1e-6)


def _pairs(seed, b=10):
    rng = np.random.default_rng(seed)
    lc, lr = rng.integers(1, 9, b).astype(np.float32), rng.integers(1, 9, b).astype(np.float32)
    pc = (-rng.gamma(2.0, 1.0, b) * lc).astype(np.float32)
    pr = (-rng.gamma(2.0, 1.0, b) * lr).astype(np.float32)
    mask = (rng.random(b) < 0.7).astype(np.float32)
    return pc, pr, lc, lr, mask


@pytest.mark.parametrize("seed,lam", [(0, 0.1), (1, 1.0)])
def test_orpo_matches_numpy_loop(seed, lam):
    pc, pr, lc, lr, mask = _pairs(seed)
    loss, m = jax.jit(functools.partial(orpo_loss, orpo_lambda=lam))(pc, pr, lc, lr, mask=mask)
    np.testing.assert_allclose(float(loss), orpo_reference(pc, pr, lc, lr, mask, lam=lam),
                               rtol=1e-5)
    keep = mask > 0
    sliced, _ = orpo_loss(pc[keep], pr[keep], lc[keep], lr[keep], orpo_lambda=lam)
    np.testing.assert_allclose(float(loss), float(sliced), rtol=1e-6)
    g = jax.grad(lambda a, b: orpo_loss(a, b, lc, lr, orpo_lambda=lam, mask=mask)[0],
                 argnums=(0, 1))(pc, pr)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in g)
    assert np.all(np.asarray(g[0])[keep] < 0) and np.all(np.asarray(g[1])[keep] > 0)


def test_orpo_is_finite_at_probability_one_and_registered_reference_free():
    loss, _ = orpo_loss(jnp.zeros(3), jnp.array([-1e-9, -3.0, -80.0]), jnp.ones(3), jnp.ones(3),
                        orpo_lambda=0.5)
    assert np.isfinite(float(loss))
    assert PREFERENCE_LOSSES["orpo"] is orpo_loss and "orpo" in REFERENCE_FREE
    # through the K-wise path the stage uses: ranking [[2, 1, 0]] → pairs (0,1), (0,2), (1,2)
    logps = jnp.array([[-2.0, -4.0, -9.0]])
    lengths = jnp.array([[2.0, 4.0, 3.0]])
    loss, _ = kwise_preference_loss("orpo", logps, None, lengths, jnp.array([[2.0, 1.0, 0.0]]),
                                    orpo_lambda=0.3)
    pc, pr = np.array([-2.0, -2.0, -4.0]), np.array([-4.0, -9.0, -9.0])
    lc, lr = np.array([2.0, 2.0, 4.0]), np.array([4.0, 3.0, 3.0])
    np.testing.assert_allclose(float(loss), orpo_reference(pc, pr, lc, lr, np.ones(3), lam=0.3),
                               rtol=1e-5)


def test_log1mexp_is_accurate_at_both_ends():
    x = np.array([-1e-8, -1e-3, -0.5, -np.log(2.0), -1.0, -20.0, -100.0])
    want = np.log(-np.expm1(x.astype(np.float64)))
    got = np.asarray(log1mexp(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --- end to end through experiments/dpo.py on a tiny reward upstream ---------------------------

TINY_OFFLINE = ["--steps", "6", "--batch-prompts", "4", "--optim.warmup-steps", "1",
                "--log-every", "3", "--checkpoint-every", "3"]


@pytest.fixture
def tiny_reward_run(reward_run):
    """The session's shared small reward run (tests/conftest.py)."""
    return reward_run


def test_kto_end_to_end_stores_its_labels_and_resumes_bit_exactly(tiny_reward_run, tmp_path):
    import json
    import shutil

    from rlhf_jax import scripts
    from rlhf_jax.data.preference_records import decode_record
    from rlhf_jax.data.preferences import load_preference_source

    argv = ["--reward-dir", str(tiny_reward_run), "--loss", "kto", *TINY_OFFLINE,
            "--optim.learning-rate", "1e-3"]
    full = tmp_path / "full"
    s = scripts.load("dpo").main(["--out", str(full), *argv])
    assert s["start"] == "sft" and np.isfinite(s["gold/kto"])
    stats = {k.split("/", 1)[1]: v for k, v in s.items() if k.startswith("binary_feedback/")}
    assert stats["desirable"] + stats["undesirable"] == stats["responses"] > 0
    # the stored data set holds exactly the labels trained on: 0/1, as many as responses
    src = load_preference_source(full / "data", "facts_world_binary_feedback", "train")
    labels = np.concatenate([decode_record(r)["ranking"] for r in src])
    assert set(np.unique(labels)) <= {0.0, 1.0} and labels.size == stats["responses"]
    assert labels.mean() == pytest.approx(stats["desirable_share"])
    rows = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["kto/loss"]) and r["kto/kl_ref_point"] >= 0 for r in rows
               if "kto/loss" in r)
    # kill after the first checkpoint: the rerun resumes and ends bit-identical
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "6")
    shutil.rmtree(cut / "params")
    (cut / "summary.json").unlink()
    again = scripts.load("dpo").main(["--out", str(cut), *argv])
    assert again["gold/kto"] == s["gold/kto"]
    assert (cut / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()


def test_orpo_starts_from_the_pretrained_model_and_is_reference_free(tiny_reward_run, tmp_path):
    from rlhf_jax import scripts

    s = scripts.load("dpo").main(["--out", str(tmp_path / "orpo"), "--reward-dir",
                                  str(tiny_reward_run), "--loss", "orpo", *TINY_OFFLINE,
                                  "--optim.learning-rate", "1e-3"])
    assert s["start"] == "base"
    assert np.isfinite(s["final/orpo/nll"]) and np.isfinite(s["final/orpo/odds_ratio_loss"])
    assert "win_rate/orpo_vs_sft" in s and "kl/orpo_vs_sft" in s
