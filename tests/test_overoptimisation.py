"""Over-optimisation (``rlhf_jax.overoptimisation``, ``rlhf_jax.best_of_n``,
``experiments/overoptimisation.py``): Gao et al.'s fits recover known coefficients, the exact
best-of-n distribution equals brute-force enumeration, and the sweep runs end to end on the tiny
upstream and reuses its finished cells."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil

import numpy as np
import pytest

from rlhf_jax import best_of_n as bon
from rlhf_jax import overoptimisation as oo


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.3, 0.4), ("rl", 0.8, 0.5),
                                             ("rl", 0.5, -0.1)])
def test_fit_recovers_known_coefficients(form, alpha, beta):
    rng = np.random.default_rng(0)
    d = np.sqrt(rng.uniform(0, 9, size=200))
    gain = oo.gao(d, alpha, beta, form)
    exact = oo.fit(d, gain, form)
    assert exact["alpha"] == pytest.approx(alpha, abs=1e-9)
    assert exact["beta"] == pytest.approx(beta, abs=1e-9)
    assert exact["r2"] == pytest.approx(1.0)
    noisy = oo.fit(d, gain + rng.normal(0, 0.02, size=d.shape), form)
    assert noisy["alpha"] == pytest.approx(alpha, abs=0.02)
    assert noisy["beta"] == pytest.approx(beta, abs=0.02)
    assert 0.9 < noisy["r2"] < 1.0


def test_forms_and_peaks_by_hand():
    # bon: d(α − βd) at d = 2 with α = 1, β = 0.25 → 2 · 0.5 = 1; peak at α/(2β) = 2
    assert oo.gao(2.0, 1.0, 0.25, "bon")[0] == pytest.approx(1.0)
    assert oo.peak(1.0, 0.25, "bon") == pytest.approx(2.0)
    # rl: d(α − β log d) is 0 at d = 0, α·1 at d = 1; peak where α − β(log d + 1) = 0
    assert oo.gao([0.0, 1.0], 0.7, 0.3, "rl").tolist() == pytest.approx([0.0, 0.7])
    d_star = oo.peak(0.7, 0.3, "rl")
    assert 0.7 - 0.3 * (math.log(d_star) + 1) == pytest.approx(0.0, abs=1e-12)
    assert oo.peak(0.7, -0.3, "rl") is None and oo.peak(1.0, 0.0, "bon") is None


def test_a_best_of_n_gain_falling_from_the_start_peaks_at_zero():
    # α < 0 < β: d(α − βd) < 0 for every d > 0, largest at d = 0 (α/2β < 0 is no KL)
    assert oo.peak(-0.5, 0.5, "bon") == 0.0
    d = np.sqrt([0.0, 0.17, 0.5, 0.85, 1.1, 1.3])
    r = oo.read_out(d, oo.gao(d, -0.5, 0.5, "bon"), 0.0, "bon")
    assert r["kl_at_peak"] is None and r["kl_at_peak_fitted"] == 0.0 and r["gold_peak"] == 0.0


def test_read_out_reports_a_peak_only_inside_the_range():
    d = np.linspace(0, 3, 30)
    rising = oo.read_out(d, 0.5 + oo.gao(d, 1.0, 0.1, "bon"), 0.5, "bon")   # peak at d = 5
    assert rising["kl_at_peak"] is None and rising["kl_at_peak_fitted"] == pytest.approx(25)
    assert rising["kl_max"] == pytest.approx(9) and rising["gold0"] == 0.5
    assert rising["gold_peak"] == pytest.approx(0.5 + 3 * (1 - 0.3))
    peaked = oo.read_out(d, oo.gao(d, 1.0, 0.25, "bon"), 0.0, "bon")      # peak at d = 2
    assert peaked["kl_at_peak"] == pytest.approx(4.0) and peaked["gold_peak"] == pytest.approx(1)


def _brute_force(p, scores, n):
    """P(best of n draws = item k) by enumerating all K^n draws (ties: uniform over positions)."""
    q = np.zeros(len(p))
    for draw in itertools.product(range(len(p)), repeat=n):
        prob = np.prod([p[i] for i in draw])
        top = max(scores[i] for i in draw)
        winners = [i for i in draw if scores[i] == top]
        for i in winners:
            q[i] += prob / len(winners)
    return q


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_best_of_n_distribution_equals_brute_force(n):
    p = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    scores = np.array([0.3, -1.0, 0.3, 2.0, -0.5])      # a tie between items 0 and 2
    q = bon.bon_distribution(p, scores, n)
    ref = _brute_force(p, scores, n)
    np.testing.assert_allclose(q, ref, atol=1e-12)
    kl_ref = sum(r * math.log(r / pi) for r, pi in zip(ref, p) if r > 0)
    assert bon.kl(q, p) == pytest.approx(kl_ref, abs=1e-12)
    assert bon.kl(q, p) <= bon.kl_bound(n) + 1e-12


def test_best_of_n_kl_meets_the_bound_only_for_distinct_samples():
    rng = np.random.default_rng(1)
    for n in (2, 8, 32):
        for m in (128, 20000):                              # all distinct, equally likely
            q = bon.bon_distribution(np.full(m, 1 / m), rng.permutation(m).astype(float), n)
            assert bon.kl(q, np.full(m, 1 / m)) == pytest.approx(bon.kl_bound(n), abs=5e-3)
        for _ in range(20):                                 # repeats: strictly below the bound
            k = int(rng.integers(2, 6))
            p = rng.dirichlet(np.ones(k))
            assert bon.kl(bon.bon_distribution(p, rng.normal(size=k), n), p) < bon.kl_bound(n)


def test_pool_curve_by_hand():
    # prompt 0: "a" ×2 (proxy 1, gold 1), "b" ×2 (proxy 0, gold 0); prompt 1: one answer ×4
    texts = [["a", "b", "a", "b"], ["c"] * 4]
    proxy = np.array([[1.0, 0.0, 1.0, 0.0], [5.0] * 4])
    gold = np.array([[1.0, 0.0, 1.0, 0.0], [-1.0] * 4])
    n1, n2 = bon.pool_curve(texts, proxy, gold, [1, 2])
    assert n1["kl"] == 0 and n1["gold"] == pytest.approx((0.5 - 1) / 2)
    assert n1["distinct"] == 1.5 and n2["kl_bound"] == pytest.approx(math.log(2) - 0.5)
    # best of 2 on prompt 0 picks "a" with 3/4: KL = 3/4 log(3/2) + 1/4 log(1/2), prompt 1: 0
    assert n2["kl"] == pytest.approx((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2)
    assert n2["gold"] == pytest.approx((0.75 - 1) / 2)
    assert n2["proxy"] == pytest.approx((0.75 + 5) / 2)
    with pytest.raises(ValueError, match="prompt 1: 3 responses"):
        bon.pool_curve([["a"] * 4, ["c"] * 3], proxy, gold, [1])


def test_matched_interpolates_best_of_n_at_each_cells_kl():
    curve = [{"kl": 0.0, "gold": 0.0}, {"kl": 0.4, "gold": 0.2}, {"kl": 1.0, "gold": 0.5}]
    out = oo.matched([{"cell": "a", "kl": 0.7}, {"cell": "b", "kl": 2.0}], curve)
    assert out[0]["gold_bon"] == pytest.approx(0.35) and out[1]["gold_bon"] is None


@pytest.fixture(scope="module")
def tiny_overopt():
    """The cached tiny sweep (shared with notebook 03's fallback): one PPO cell + best-of-n."""
    from rlhf_jax import tiny

    return tiny.cached_run("overoptimisation", oo.tiny_config())


def test_the_sweep_runs_end_to_end_and_reuses_finished_cells(tiny_overopt, tmp_path):
    from rlhf_jax import scripts

    summary, results = oo.load_result(tiny_overopt)
    for key in ("fit/bon/alpha", "fit/bon/beta", "fit/bon/r2", "fit/rl/alpha", "fit/rl/beta",
                "fit/rl/r2", "kl_at_gold_peak/rl", "gold/peak/rl", "gold/peak/bon"):
        assert key in summary
    assert summary["kl/bon_bound_n4"] == pytest.approx(math.log(4) - 0.75)
    assert 0 <= summary["kl/bon_n4"] <= summary["kl/bon_bound_n4"] + 1e-9
    traj = results["default"]["trajectories"]["ppo-default-kl0.05"]
    assert [p["step"] for p in traj] == [1, 2, 3, 4] and traj[0]["kl"] == 0.0
    for name in ("proxy_vs_gold.png", "gold_vs_kl.png"):
        assert (tiny_overopt / name).stat().st_size > 0
    assert "best-of-n" in (tiny_overopt / "results.md").read_text()
    # killed after its PPO run: the rerun reuses the finished run and the best-of-n pool
    out = tmp_path / "overopt"
    shutil.copytree(tiny_overopt, out)
    (out / "summary.json").unlink()
    (out / "bon" / "default.json").unlink()
    cell = out / "ppo-default-kl0.05" / "seed0" / "summary.json"
    stamp, pool = cell.stat().st_mtime_ns, (out / "bon" / "pool.json").stat().st_mtime_ns
    again = scripts.load("overoptimisation").run(oo.tiny_config(), out)
    assert cell.stat().st_mtime_ns == stamp and (out / "bon" / "pool.json").stat().st_mtime_ns \
        == pool
    assert again["fit/bon/alpha"] == pytest.approx(summary["fit/bon/alpha"])


def test_the_weak_reward_model_is_a_share_of_the_same_comparisons():
    from rlhf_jax import scripts, tiny
    from rlhf_jax.runs import RunDir

    up = tiny.tiny_upstream()
    cfg = dataclasses.replace(oo.tiny_config(), weak_share=0.5)
    cell = scripts.load("overoptimisation").weak_cell(cfg, up)
    n = RunDir(up).read_summary()["preferences/train_prompts"]
    assert cell.script == "reward" and cell.config.freeze_trunk is False
    assert cell.config.train_prompts == max(round(n / 2), cell.config.batch_prompts)
    assert cell.config.preferences_dir == str(up / "data")
    assert cell.config.sft_dir == json.loads((up / "config.json").read_text())["sft_dir"]


def test_readme_shows_the_committed_result_rendered_from_its_files():
    import re
    from pathlib import Path

    committed = oo.COMMITTED
    results = json.loads((committed / "results.json").read_text())
    table = oo.markdown(results)
    assert (committed / "results.md").read_text() == table
    summary = json.loads((committed / "summary.json").read_text())
    for rm, sfx in (("default", ""), ("weak", "/weak_rm")):
        for form in ("bon", "rl"):
            assert summary[f"fit/{form}/alpha{sfx}"] == results[rm]["fits"][form]["alpha"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- overoptimisation:start -->\n(.*?)<!-- overoptimisation:end -->",
                      readme, re.S)
    assert block and block.group(1) == table


def test_first_prompts_keeps_the_first_comparisons_and_zero_keeps_all():
    from rlhf_jax.configs import ConfigError
    from rlhf_jax.labeler import Preferences
    from rlhf_jax.stages.reward import RewardConfig, first_prompts

    prefs = Preferences(prompts=["p0", "p1", "p2"], responses=[["a", "b"]] * 3,
                        ranking=np.arange(6.0).reshape(3, 2), gold=np.ones((3, 2)),
                        kinds=[["x", "y"]] * 3)
    two = first_prompts(prefs, 2)
    assert two.prompts == ["p0", "p1"] and two.ranking.tolist() == [[0, 1], [2, 3]]
    assert len(two.responses) == len(two.kinds) == len(two.gold) == 2
    assert first_prompts(prefs, 0) is prefs
    with pytest.raises(ConfigError, match="train_prompts"):
        RewardConfig(train_prompts=-1)


def test_help_lists_options_and_bad_values_name_their_field(capsys, monkeypatch, tmp_path):
    from rlhf_jax import scripts
    from rlhf_jax.configs import ConfigError

    script = scripts.load("overoptimisation")
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--seed", "--reward-dir", "--kl-coefs", "--extra-cells", "--weak-share",
                 "--ns", "--pool", "--ppo.iterations"):
        assert flag in out, flag
    for bad, field in [({"pool": 16}, "pool"), ({"weak_share": 1.0}, "weak_share"),
                       ({"kl_coefs": (0.1, 0.1)}, "kl_coefs"), ({"ns": (4, 2)}, "ns"),
                       ({"extra_cells": ("kl0",)}, "extra_cells")]:
        with pytest.raises(ConfigError, match=field):
            script.OveroptConfig(**bad)
    with pytest.raises(ConfigError, match="kl-cof"):   # extra cells are checked against PPO's flags
        script.ppo_cells(script.OveroptConfig(extra_cells=("ppo.kl-cof=0",)), "default",
                         tmp_path)
