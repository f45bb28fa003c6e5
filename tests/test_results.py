"""README's results tables are rendered from the committed files in results/; the run reader and
the optional TensorBoard / W&B mirrors round-trip what the runs write."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import log_writers, results
from rlhf_jax.runs import RunDir, load, load_run

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_equal_the_committed_results():
    assert results.check_readme(ROOT / "README.md", ROOT / "results") == []


def test_collect_render_and_check_a_run_into_a_readme(tmp_path):
    from rlhf_jax import tiny

    run = tiny.tiny_run("ppo")
    (seed0,) = results.collect([run], tmp_path / "res" / "pipeline")
    assert seed0.name == "seed0"
    assert sum(f.stat().st_size for f in seed0.iterdir()) < 200_000
    sft = [json.loads(line) for line in (seed0 / "samples_sft.jsonl").read_text().splitlines()]
    assert len({r["uid"] for r in sft}) <= results.PROMPTS_KEPT
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    assert results.check_readme(readme, tmp_path / "res")   # runs there, no block yet
    assert results.update_readme(readme, tmp_path / "res") == ["pipeline"]
    assert results.check_readme(readme, tmp_path / "res") == []
    block = results.blocks(readme.read_text())["pipeline"]
    s = json.loads((run / "summary.json").read_text())
    assert f"| SFT | {s['gold/sft']:.3f}".replace("-", "−") in block
    assert f"{s['kl/rlhf_vs_sft']:.3f} |" in block
    # one number changed in the README is caught
    text = readme.read_text().replace(f"{s['kl/rlhf_vs_sft']:.3f} |", "9.999 |")
    readme.write_text(text)
    assert results.check_readme(readme, tmp_path / "res")


def test_run_reader_round_trips_what_a_run_writes(tmp_path):
    run = RunDir(tmp_path / "r")
    run.write_config({"seed": 3, "ppo": {"kl_coef": 0.05}})
    run.write_meta(seed=3)
    rows = [{"train/loss": 1.5, "kl/per_token": 0.1}, {"train/loss": math.nan},
            {"train/loss": 0.5, "kl/per_token": math.inf}]
    for i, r in enumerate(rows):
        run.log_metrics(i + 1, r)
    run.write_summary({"gold/rlhf": 0.25, "wins/rlhf_vs_sft": 7})
    run.write_jsonl("samples_sft.jsonl", [{"uid": "a", "sample": 0, "label": "correct"}])
    r = load_run(tmp_path / "r")
    assert r.config == {"seed": 3, "ppo": {"kl_coef": 0.05}} and r.meta["seed"] == 3
    assert r.summary == {"gold/rlhf": 0.25, "wins/rlhf_vs_sft": 7} and r.finished
    steps, loss = r.series("train/loss")
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_array_equal(loss, [1.5, np.nan, 0.5])
    cols = r.arrays()
    np.testing.assert_array_equal(cols["kl/per_token"], [0.1, np.nan, np.inf])
    assert r.sample_names() == ["sft"] and r.samples("sft")[0]["label"] == "correct"
    df = r.to_pandas()
    assert list(df["step"]) == [1, 2, 3] and df["train/loss"].iloc[2] == 0.5
    assert isinstance(load(tmp_path / "r"), type(r))
    with pytest.raises(FileNotFoundError, match="samples_rlhf"):
        r.samples("rlhf")


def test_tensorboard_and_wandb_mirror_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv(log_writers.ENV, "tensorboard,wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir(tmp_path / "r")
    run.write_config({"seed": 0})
    for step in range(1, 4):
        run.log_metrics(step, {"train/loss": 1.0 / step, "note": "text", "bad": math.nan})
    log_writers.close()
    tb = log_writers.read_tensorboard(tmp_path / "r" / "tensorboard")
    assert set(tb) == {"train/loss"}
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in tb["train/loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
    (wb,) = (tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"train/loss" in wb.read_bytes() and b"0.5" in wb.read_bytes()
    # metrics.jsonl is unchanged by the mirrors; off by default
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    monkeypatch.delenv(log_writers.ENV)
    RunDir(tmp_path / "off").log_metrics(1, {"x": 1.0})
    assert not (tmp_path / "off" / "tensorboard").exists()
    monkeypatch.setenv(log_writers.ENV, "tensorbored")
    with pytest.raises(ValueError, match="tensorbored"):
        log_writers.enabled()
