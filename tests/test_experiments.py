"""End-to-end runs of the experiment scripts on a tiny config (seconds, not minutes)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY_PRETRAIN = [
    "--pretrain.steps", "30", "--pretrain.batch-size", "8", "--pretrain.seq-len", "32",
    "--pretrain.model.d-model", "32", "--pretrain.model.n-layers", "1",
    "--pretrain.model.n-heads", "2", "--pretrain.task.world.n-real", "12",
    "--pretrain.task.world.n-fictional", "12", "--pretrain.task.world.docs-per-person", "2",
    "--pretrain.log-every", "5", "--pretrain.checkpoint-every", "10",
    "--pretrain.optim.warmup-steps", "5",
]
TINY_SFT = ["--steps", "20", "--batch-size", "8", "--ptx-batch-size", "4", "--log-every", "5",
            "--optim.warmup-steps", "5"]


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script, ROOT / "experiments" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def two_sft_runs(tmp_path_factory):
    sft = _load("sft")
    outs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(name) / "run"
        sft.main(["--out", str(out), *TINY_PRETRAIN, *TINY_SFT])
        outs.append(out)
    return outs


def test_sft_end_to_end_writes_run_directory(two_sft_runs):
    out = two_sft_runs[0]
    for name in ("config.json", "meta.json", "metrics.jsonl", "timings.jsonl", "summary.json",
                 "samples_sft.jsonl", "demonstrations.jsonl"):
        assert (out / name).exists(), name
    assert (out / "params").is_dir() and (out / "checkpoints").is_dir()
    assert (out / "pretrain" / "summary.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    for key in ("gold/base", "gold/sft", "fabrication_rate/sft", "accuracy/sft", "unknown_rate/sft",
                "demonstrator/fabrication_rate", "time_s/pretrain", "time_s/sft"):
        assert key in summary, key
    assert -2.0 <= summary["gold/sft"] <= 1.0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    assert not any("time" in k for m in metrics for k in m), "wall-clock figures leaked into metrics"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["jax_version"]
    config = json.loads((out / "config.json").read_text())
    assert config["pretrain"]["model"]["vocab_size"] > 3  # resolved from the tokenizer


def test_same_seed_gives_identical_metrics(two_sft_runs):
    a, b = two_sft_runs
    for stage in (Path("."), Path("pretrain")):
        assert (a / stage / "metrics.jsonl").read_text() == (b / stage / "metrics.jsonl").read_text()
    assert (a / "samples_sft.jsonl").read_text() == (b / "samples_sft.jsonl").read_text()


def test_finished_run_is_reused_not_retrained(two_sft_runs, tmp_path):
    """``--pretrain-dir`` starts SFT from a finished pretraining run, with the same result."""
    a = two_sft_runs[0]
    out = tmp_path / "again"
    _load("sft").main(["--out", str(out), "--pretrain-dir", str(a / "pretrain"), *TINY_SFT])
    assert (out / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    """Losing everything after the step-20 checkpoint (as a kill would) and rerunning the same
    command resumes there and ends with the same metrics and parameters, bit for bit."""
    import shutil

    import numpy as np
    import orbax.checkpoint as ocp

    pre = _load("pretrain")
    args = [a.replace("--pretrain.", "--") for a in TINY_PRETRAIN]
    full, cut = tmp_path / "full", tmp_path / "cut"
    pre.main(["--out", str(full), *args])
    pre.main(["--out", str(cut), *args])
    shutil.rmtree(cut / "checkpoints" / "30")
    shutil.rmtree(cut / "params")
    (cut / "summary.json").unlink()
    rows = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(rows + rows[-2:]) + "\n")  # rows after the cut
    pre.main(["--out", str(cut), *args])
    assert (cut / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    with ocp.StandardCheckpointer() as c:
        a, b = c.restore(full / "params"), c.restore(cut / "params")
    for x, y in zip(__import__("jax").tree.leaves(a), __import__("jax").tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("script", ["pretrain", "sft"])
def test_help_lists_every_option(script):
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{script}.py"), "--help"],
                         capture_output=True, text=True, timeout=120,
                         env={"RLHF_JAX_NO_REEXEC": "1", "PATH": "/usr/bin:/bin",
                              "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for flag in ("--out", "--seed", "--steps", "--batch-size", "--optim.learning-rate"):
        assert flag in out.stdout


@pytest.mark.parametrize("args, field", [
    (["--steps", "0"], "steps"),
    (["--optim.warmup-steps", "9999"], "warmup_steps"),
    (["--model.n-heads", "3"], "n_heads"),
    (["--task.eval-samples", "2"], "eval_samples"),
    (["--task.max-new-tokens", "60"], "max_new_tokens"),
])
def test_bad_config_fails_naming_the_field(args, field, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _load("pretrain").main(["--out", str(tmp_path / "x"), *args])
    assert exc.value.code == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "a bad config must fail before writing anything"


def test_notebook_runs_on_a_run_directory(two_sft_runs, monkeypatch):
    """Execute the notebook's code cells in order against a real (tiny) run directory."""
    import matplotlib

    matplotlib.use("Agg")
    nb = json.loads((ROOT / "notebooks" / "explore_runs.ipynb").read_text())
    monkeypatch.setenv("RUN_DIR", str(two_sft_runs[0]))
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "explore_runs.ipynb", "exec"), scope)
    assert "gold/sft" in scope["summary"]
    assert set(scope["labels"]) == {"base", "sft"}


SMALL_REWARD = [  # small, but SFT learns enough of the format to give pairs of different gold
    "--sft.pretrain.steps", "150", "--sft.pretrain.batch-size", "16", "--sft.pretrain.seq-len",
    "32", "--sft.pretrain.model.d-model", "64", "--sft.pretrain.model.n-layers", "1",
    "--sft.pretrain.task.world.n-real", "16", "--sft.pretrain.task.world.n-fictional", "16",
    "--sft.pretrain.task.world.docs-per-person", "4", "--sft.pretrain.optim.warmup-steps", "10",
    "--sft.steps", "150", "--sft.batch-size", "16", "--sft.ptx-batch-size", "4",
    "--sft.optim.warmup-steps", "10", "--steps", "100", "--batch-prompts", "8",
    "--optim.warmup-steps", "5", "--optim.learning-rate", "2e-3",
]


def test_reward_end_to_end_on_small_config(tmp_path):
    """Pretrain + SFT + preference collection (stored as TFDS) + RM training on a small config:
    the RM beats chance on held-out pairs; rerunning from the stored data set reproduces it."""
    reward = _load("reward")
    out = tmp_path / "rm"
    summary = reward.main(["--out", str(out), *SMALL_REWARD])
    for key in ("rm/accuracy", "rm/noise_ceiling", "rm/gold_agreement", "rm/spearman",
                "time_s/reward"):
        assert key in summary, key
    assert 0.5 < summary["rm/noise_ceiling"] < 1.0
    assert summary["rm/gold_pairs"] >= 50
    assert summary["rm/gold_agreement"] > 0.55, summary
    assert (out / "data").is_dir() and (out / "params").is_dir()
    again = reward.main(["--out", str(tmp_path / "rm2"), "--sft-dir", str(out / "sft"),
                         "--preferences-dir", str(out / "data"), *SMALL_REWARD[SMALL_REWARD.index("--steps"):]])
    assert again["rm/gold_agreement"] == summary["rm/gold_agreement"]
    assert again["rm/noise_ceiling"] == summary["rm/noise_ceiling"]


def test_missing_upstream_run_is_a_named_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain_dir"):
        _load("sft").main(["--out", str(tmp_path / "s"), "--pretrain-dir", str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="sft_dir"):
        _load("reward").main(["--out", str(tmp_path / "r"), "--sft-dir", str(tmp_path / "nope")])
