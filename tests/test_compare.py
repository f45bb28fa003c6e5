"""The comparison's read-out (hand-worked cases) and its end-to-end run on a tiny config (from the
session's reward run, ``reward_run`` in conftest.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.scripts import load
from rlhf_jax.stages import compare_report as report


def test_at_kl_interpolates_at_the_first_crossing():
    curve = [(0.0, -0.1, 0.4), (0.5, 0.3, 0.2), (1.0, 0.7, 0.1)]
    gold, fab = report.at_kl(curve, 0.75)
    assert gold == pytest.approx(0.5) and fab == pytest.approx(0.15)
    assert report.at_kl(curve, 0.0) == pytest.approx((-0.1, 0.4))
    assert report.at_kl(curve, 1.0) == pytest.approx((0.7, 0.1))
    assert report.at_kl(curve, 1.5) is None
    # a trajectory whose KL goes up, down and up again is read where it first gets there
    wiggly = [(0.0, 0.0), (1.0, 1.0), (0.5, 5.0), (2.0, 9.0)]
    assert report.at_kl(wiggly, 0.8) == pytest.approx((0.8,))
    assert report.at_kl(wiggly, 1.5) == pytest.approx((5.0 + (1.5 - 0.5) / 1.5 * 4.0,))


def _run(gold, kl, curve):
    return {"gold": gold, "fabrication_rate": 0.1, "accuracy": 0.8, "unknown_rate": 0.2,
            "win_rate": 0.6, "wins": 10, "ties": 5, "losses": 2, "kl": kl, "time_s": 3.0,
            "budget": "64 RM-scored samples", "curve": curve}


FACTS = ("gold", "fabrication_rate", "accuracy", "unknown_rate")   # the facts world's metrics


def test_matched_kl_aggregate_and_table(tmp_path):
    results = {
        "ppo": [_run(0.7, 0.8, [(0, 0.0, 0.4), (0.8, 0.7, 0.1)]),
                _run(0.5, 0.6, [(0, 0.0, 0.4), (0.6, 0.5, 0.2)])],
        "dpo": [_run(0.6, 1.2, [(0, 0.0, 0.4), (1.2, 0.6, 0.1)]),
                _run(0.4, 1.0, [(0, 0.0, 0.4), (1.0, 0.4, 0.3)])],
    }
    target = report.matched_kl(results)
    assert target == 0.6
    agg = report.aggregate(results, target, metrics=FACTS, curve=FACTS[:2])
    # ppo at KL 0.6: seed 0 interpolates 0.7·0.6/0.8 = 0.525, seed 1 is its final point 0.5
    assert agg["ppo"]["gold_at_kl"][0] == pytest.approx((0.525 + 0.5) / 2)
    assert agg["ppo"]["gold_at_kl"][1] == pytest.approx(np.std([0.525, 0.5], ddof=1))
    assert agg["dpo"]["gold_at_kl"][0] == pytest.approx((0.3 + 0.24) / 2)
    assert agg["dpo"]["gold"] == pytest.approx((0.5, np.std([0.6, 0.4], ddof=1)))
    sft = [{"gold": -0.1, "fabrication_rate": 0.4, "accuracy": 0.6, "unknown_rate": 0.2}]
    table = report.markdown(results, sft, target, headline=FACTS[:3])
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| SFT | -0.100 | 0.400 | 0.600 |")
    assert "| ppo | 0.600 ± 0.141 |" in table
    assert "0.6 nats" in table or "0.600 nats" in table
    report.plot(results, target, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert math.isclose(report.mean_std([1.0])[1], 0.0)


def test_report_uses_the_tasks_own_metrics():
    """Another task's headline (here README's echo task: gold, wrong_rate) sets the columns, the
    curve's second value and the ``<name>_at_kl`` keys."""
    run = {"gold": 0.5, "wrong_rate": 0.2, "win_rate": 0.6, "wins": 3, "ties": 1, "losses": 1,
           "kl": 1.0, "time_s": 2.0, "budget": "b", "curve": [(0, 0.0, 0.4), (1.0, 0.5, 0.2)]}
    results = {"ppo": [run]}
    agg = report.aggregate(results, 0.5, metrics=("gold", "wrong_rate"),
                           curve=("gold", "wrong_rate"))
    assert agg["ppo"]["wrong_at_kl"] == pytest.approx((0.3, 0.0))
    assert agg["ppo"]["gold_at_kl"] == pytest.approx((0.25, 0.0))
    assert "fabrication_at_kl" not in agg["ppo"] and "accuracy" not in agg["ppo"]
    table = report.markdown(results, [{"gold": -0.1, "wrong_rate": 0.4}], 0.5,
                            headline=("gold", "wrong_rate"))
    assert "| method | gold | wrong | win rate vs SFT |" in table
    assert "| SFT | -0.100 | 0.400 | — | 0 |" in table
    assert "| method | gold at matched KL | wrong at matched KL |" in table
    assert "| ppo | 0.250 | 0.300 |" in table
    # a task with gold alone: a one-metric curve
    gold_only = {"ppo": [{**run, "curve": [(0, 0.0), (1.0, 0.5)]}]}
    assert set(report.aggregate(gold_only, 0.5, metrics=("gold",), curve=("gold",))["ppo"]) >= {
        "gold", "gold_at_kl"}


# PPO in the comparison runs in test_tasks.py (on the echo task, beside DPO)
TINY_COMPARE = ["--methods", "dpo", "grpo", "--seeds", "0", "1",
                "--eval-points", "2", "--samples-per-iter", "8",
                "--ppo.iterations", "2", "--ppo.ppo.minibatches", "2",
                "--ppo.policy-optim.warmup-steps", "1", "--ppo.value-optim.warmup-steps", "1",
                "--offline.steps", "4", "--offline.batch-prompts", "4",
                "--offline.optim.warmup-steps", "1", "--offline.optim.learning-rate", "1e-3"]


def test_compare_end_to_end_on_tiny_config(reward_run, tmp_path):
    out = tmp_path / "cmp"
    summary = load("compare").main(["--out", str(out), "--reward-dir", str(reward_run),
                                     *TINY_COMPARE])
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert results["methods"] == ["dpo", "grpo"] and set(runs) == {"dpo", "grpo"}
    for method, seeds in runs.items():
        assert [r["seed"] for r in seeds] == [0, 1]
        for r in seeds:
            s = json.loads((Path(r["dir"]) / "summary.json").read_text())
            name = "dpo" if method == "dpo" else "rlhf"
            assert r["gold"] == s[f"gold/{name}"] and r["kl"] == s[f"kl/{name}_vs_sft"]
            # SFT point, one intermediate held-out evaluation, the final policy
            assert len(r["curve"]) == 3 and r["curve"][0][0] == 0.0
            assert r["curve"][-1][:2] == [r["kl"], r["gold"]]
            assert r["wins"] + r["ties"] + r["losses"] == len(
                (Path(r["dir"]) / f"samples_{name}.jsonl").read_text().splitlines())
        cfg = json.loads((Path(seeds[0]["dir"]) / "config.json").read_text())
        if method != "dpo":   # the same RM-scored samples per iteration
            assert cfg["ppo"]["prompts_per_iter"] * cfg["ppo"]["group_size"] == 8
            assert cfg["reward_dir"] == str(reward_run)
    # the two seeds of a method differ; every SFT evaluation is the same one
    assert runs["dpo"][0]["gold"] != runs["dpo"][1]["gold"] or \
        runs["dpo"][0]["kl"] != runs["dpo"][1]["kl"]
    assert len({json.dumps(r["sft"]) for seeds in runs.values() for r in seeds}) == 1
    assert summary["matched_kl"] == min(r["kl"] for seeds in runs.values() for r in seeds)
    for method in runs:
        assert f"{method}/gold" in summary and f"{method}/gold_at_kl" in summary
    table = (out / "results.md").read_text()
    for method in runs:
        assert f"| {method} |" in table
    assert (out / "gold_vs_kl.png").stat().st_size > 1000
    metrics = (out / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [1, 2, 3, 4]
    # a rerun reuses every finished run: nothing changes, no result is logged twice
    again = load("compare").main(["--out", str(out), "--reward-dir", str(reward_run),
                                   *TINY_COMPARE])
    assert {k: v for k, v in again.items() if not k.startswith("time_s")} == \
        {k: v for k, v in summary.items() if not k.startswith("time_s")}
    assert (out / "metrics.jsonl").read_text() == metrics


def test_compare_config_errors_name_the_field():
    from rlhf_jax.configs import ConfigError
    from rlhf_jax.stages.compare import CompareConfig

    with pytest.raises(ConfigError, match="methods"):
        CompareConfig(methods=("ppo", "nope"))
    with pytest.raises(ConfigError, match="samples_per_iter"):
        CompareConfig(samples_per_iter=6)
    with pytest.raises(ConfigError, match="seeds"):
        CompareConfig(seeds=(1, 1))
