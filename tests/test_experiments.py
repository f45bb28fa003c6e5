"""End-to-end runs of the experiment scripts on a tiny config (seconds, not minutes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_PIPELINE, SMALL_REWARD, TINY_PPO, TINY_PRETRAIN, TINY_SFT
from rlhf_jax.scripts import load

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_sft_runs(sft_run, tmp_path_factory):
    """The session's tiny SFT run and a second run of the same command."""
    out = tmp_path_factory.mktemp("b") / "run"
    load("sft").main(["--out", str(out), *TINY_PRETRAIN, *TINY_SFT])
    return [sft_run, out]


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
    load("sft").main(["--out", str(out), "--pretrain-dir", str(a / "pretrain"), *TINY_SFT])
    assert (out / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    """Losing everything after the step-20 checkpoint (as a kill would) and rerunning the same
    command resumes there and ends with the same metrics and parameters, bit for bit."""
    import orbax.checkpoint as ocp

    pre = load("pretrain")
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


@pytest.mark.parametrize("script", ["pretrain", "sft", "reward", "ppo", "pipeline", "grpo",
                                    "rloo"])
def test_help_lists_every_option(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        load(script).main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    ppo_flags = ("--iterations", "--ppo.kl-coef", "--policy-optim.learning-rate",
                 "--ppo.loss-aggregation", "--eval-every")
    flags = {"ppo": ppo_flags, "grpo": ppo_flags, "rloo": ppo_flags,
             "pipeline": ("--ppo.iterations", "--sft.steps", "--reward.steps"),
             "reward": ("--steps", "--batch-prompts", "--optim.learning-rate")}.get(
        script, ("--steps", "--batch-size", "--optim.learning-rate"))
    for flag in ("--out", "--seed", *flags):
        assert flag in out, flag


@pytest.mark.parametrize("args, field", [
    (["--steps", "0"], "steps"),
    (["--optim.warmup-steps", "9999"], "warmup_steps"),
    (["--model.n-heads", "3"], "n_heads"),
    (["--task.eval-samples", "2"], "eval_samples"),
    (["--task.max-new-tokens", "60"], "max_new_tokens"),
])
def test_bad_config_fails_naming_the_field(args, field, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        load("pretrain").main(["--out", str(tmp_path / "x"), *args])
    assert exc.value.code == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "a bad config must fail before writing anything"


def test_reward_end_to_end_on_small_config(reward_run, tmp_path):
    """Pretrain + SFT + preference collection (stored as TFDS) + RM training on a small config
    (the session's pipeline): the RM beats chance on held-out pairs; rerunning the reward script
    from the stored data set reproduces it."""
    summary = json.loads((reward_run / "summary.json").read_text())
    for key in ("rm/accuracy", "rm/noise_ceiling", "rm/gold_agreement", "rm/spearman",
                "time_s/reward"):
        assert key in summary, key
    assert 0.5 < summary["rm/noise_ceiling"] < 1.0
    assert summary["rm/gold_pairs"] >= 50
    assert summary["rm/gold_agreement"] > 0.55, summary
    assert (reward_run / "data").is_dir() and (reward_run / "params").is_dir()
    again = load("reward").main(["--out", str(tmp_path / "rm2"), "--sft-dir",
                                 str(reward_run.parent / "sft"), "--preferences-dir",
                                 str(reward_run / "data"), *SMALL_REWARD])
    assert again["rm/gold_agreement"] == summary["rm/gold_agreement"]
    assert again["rm/noise_ceiling"] == summary["rm/noise_ceiling"]


def _refused(script: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        load(script).main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_missing_wrong_or_contradicted_upstream_run_is_a_named_error(sft_run, tmp_path, capsys):
    """An upstream directory that holds no finished run, a run of another stage, or a finished
    run that the command's upstream flags contradict (they would be dropped silently) is
    refused naming the field and, for a contradiction, the flags; nothing is written."""
    err = _refused("sft", ["--out", str(tmp_path / "s"), "--pretrain-dir", str(tmp_path / "no")],
                   capsys)
    assert "pretrain_dir" in err and "no finished run" in err
    assert "sft_dir" in _refused("reward", ["--out", str(tmp_path / "r"), "--sft-dir",
                                            str(tmp_path / "no")], capsys)
    # what the checks read of a finished run: its config and summary
    copy = tmp_path / "s1"
    for d in (copy, copy / "pretrain"):
        d.mkdir()
        for name in ("config.json", "summary.json"):
            shutil.copy(sft_run / d.relative_to(copy) / name, d / name)
    err = _refused("reward", ["--out", str(tmp_path / "r"), "--sft-dir", str(copy / "pretrain")],
                   capsys)
    assert "sft_dir" in err and "not a finished sft run" in err
    # a given run: only the upstream flags set on the command line count
    err = _refused("sft", ["--out", str(tmp_path / "s2"), "--pretrain-dir", str(copy / "pretrain"),
                           "--pretrain.steps", "31", "--pretrain.model.n-heads", "2", *TINY_SFT],
                   capsys)
    assert "pretrain_dir" in err and "steps" in err and "n_heads" not in err
    # the run's own upstream directory, rerun with another upstream setting
    flags = [f if f != "30" else "31" for f in TINY_PRETRAIN]
    err = _refused("sft", ["--out", str(copy), *flags, *TINY_SFT], capsys)
    assert "pretrain_dir" in err and ": steps —" in err
    assert not (tmp_path / "s").exists() and not (tmp_path / "s2").exists()
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", "pretrain", "summary.json"]


def test_ppo_end_to_end_on_small_config(pipeline_run, tmp_path):
    """PPO from a finished reward run: summary keys, finite diagnostics, plots, paired counts; the
    same numbers as the pipeline's PPO stage on that reward run."""
    out = tmp_path / "ppo"
    summary = load("ppo").main(["--out", str(out), "--reward-dir",
                                str(pipeline_run / "reward"), *TINY_PPO])
    for key in ("gold/base", "gold/sft", "gold/rlhf", "gold/best_of_n", "kl/best_of_n",
                "fabrication_rate/sft", "fabrication_rate/rlhf", "accuracy/sft", "accuracy/rlhf",
                "win_rate/rlhf_vs_sft", "wins/rlhf_vs_sft", "ties/rlhf_vs_sft",
                "losses/rlhf_vs_sft", "win_rate/ceiling", "kl/rlhf_vs_sft", "rm/gold_agreement",
                "rm/gold_agreement_on_policy", "time_s/pretrain", "time_s/sft", "time_s/reward",
                "time_s/ppo"):
        assert key in summary, key
    n_eval = summary["wins/rlhf_vs_sft"] + summary["ties/rlhf_vs_sft"] + summary["losses/rlhf_vs_sft"]
    assert n_eval == len((out / "samples_rlhf.jsonl").read_text().splitlines())
    assert 0.5 <= summary["win_rate/ceiling"] <= 1.0
    assert summary["kl/rlhf_vs_sft"] >= 0.0
    assert summary["max/rollout/logprob_max_diff"] <= 1e-5
    assert np.isclose(summary["kl/best_of_n"], np.log(4) - 3 / 4)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("kl/per_token", "kl/per_sequence", "kl/entropy_term", "kl/cross_entropy_term",
                "train/approx_kl", "train/clip_frac", "rollout/entropy",
                "rollout/value_explained_var", "rollout/rm_score", "rollout/length",
                "rollout/rm_gold_gap", "rollout/rm_gold_agreement",
                "rollout/reward_length_corr", "rollout/logprob_mean_diff"):
        assert key in rows[-1], key
    for png in ("reward.png", "kl.png", "gold.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "metrics.jsonl").read_text() == \
        (pipeline_run / "ppo" / "metrics.jsonl").read_text()


TINY_ONLINE = ["--iterations", "3", "--ppo.prompts-per-iter", "4", "--policy-optim.warmup-steps",
               "1", "--checkpoint-every", "2", "--eval-every", "2"]


@pytest.mark.parametrize("script, method", [("grpo", "grpo"), ("rloo", "rloo")])
def test_online_scripts_end_to_end_on_small_config(reward_run, tmp_path, script, method):
    """GRPO / RLOO from a finished reward run: the preset is the default config (any --ppo.* flag
    overrides it), PPO's summary keys, held-out evaluation logged every --eval-every iterations
    (and equal, at the last iteration, to the final evaluation of the saved policy)."""
    from rlhf_jax.stages.online import online_config

    out = tmp_path / script
    summary = load(script).main(["--out", str(out), "--reward-dir", str(reward_run), *TINY_ONLINE,
                                  "--ppo.kl-coef", "0.07"])
    config = json.loads((out / "config.json").read_text())
    want = online_config(method, kl_coef=0.07)
    for field in ("advantage", "policy_loss", "loss_aggregation", "group_size", "critic",
                  "whiten_advantages", "kl_in_loss", "epochs", "minibatches"):
        assert config["ppo"][field] == getattr(want.ppo, field), field
    assert config["ppo"]["kl_coef"] == 0.07 and config["ppo"]["prompts_per_iter"] == 4
    for key in ("gold/sft", "gold/rlhf", "fabrication_rate/rlhf", "accuracy/rlhf",
                "win_rate/rlhf_vs_sft", "kl/rlhf_vs_sft", "time_s/ppo"):
        assert key in summary, key
    n_eval = summary["wins/rlhf_vs_sft"] + summary["ties/rlhf_vs_sft"] + summary["losses/rlhf_vs_sft"]
    assert n_eval == len((out / "samples_rlhf.jsonl").read_text().splitlines())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    held = ("heldout/gold", "heldout/fabrication_rate", "heldout/accuracy", "heldout/kl")
    assert all(k in rows[1] for k in held) and not any(k in rows[0] or k in rows[2] for k in held)
    assert rows[1]["heldout/kl"] >= 0.0 and -2.0 <= rows[1]["heldout/gold"] <= 1.0
    assert np.isfinite([v for r in rows for v in r.values()]).all()


def test_eval_every_matches_final_evaluation_and_resumes_bit_identically(reward_run, tmp_path):
    """The held-out evaluation logged at the last iteration uses the final evaluation's pinned
    protocol: its numbers equal the summary's, and it writes no samples file of its own. Losing
    everything after the iteration-2 checkpoint and rerunning gives byte-identical metrics
    (held-out evaluations included)."""
    out = tmp_path / "g"
    args = list(TINY_ONLINE)
    args[args.index("--eval-every") + 1] = "1"
    argv = ["--out", str(out), "--reward-dir", str(reward_run), *args]
    summary = load("grpo").main(argv)
    full = (out / "metrics.jsonl").read_text()
    last = json.loads(full.splitlines()[-1])
    assert last["heldout/gold"] == summary["gold/rlhf"]
    assert last["heldout/fabrication_rate"] == summary["fabrication_rate/rlhf"]
    assert last["heldout/accuracy"] == summary["accuracy/rlhf"]
    np.testing.assert_allclose(last["heldout/kl"], summary["kl/rlhf_vs_sft"], rtol=1e-6)
    assert sorted(p.name for p in out.glob("samples_*.jsonl")) == [
        "samples_best_of_n.jsonl", "samples_rlhf.jsonl", "samples_sft.jsonl"]

    shutil.rmtree(out / "checkpoints" / "3")
    shutil.rmtree(out / "params")
    (out / "summary.json").unlink()
    again = load("grpo").main(argv)
    assert (out / "metrics.jsonl").read_text() == full
    assert again["gold/rlhf"] == summary["gold/rlhf"]


def test_pipeline_end_to_end_on_small_config(pipeline_run, tmp_path):
    """The session's pipeline wrote every stage's run; a rerun reuses the finished stages."""
    summary = json.loads((pipeline_run / "summary.json").read_text())
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert (pipeline_run / stage / "summary.json").exists(), stage
    assert "gold/rlhf" in summary and summary["time_s/pipeline"] > 0
    out = tmp_path / "pipe"
    shutil.copytree(pipeline_run, out)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*") if p.is_file()}
    again = load("pipeline").main(["--out", str(out), *SMALL_PIPELINE])
    assert again == summary, "the rerun changed the finished pipeline's summary (its wall time)"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a finished stage was rerun"


def test_pipeline_final_stage_rerun_with_other_flags_is_refused_not_reused(tmp_path,
                                                                             monkeypatch):
    """``pipeline.run(final=…)`` (sentiment.py's offline last stage) is not in the pipeline's
    config: a rerun with a changed flag of it was reused silently (β=0.1 reported as asked for
    β=0.5), and after another method on the same upstream, <out>/summary.json (of that method)
    was returned as this one's. Stages faked: each writes its config and a summary."""
    import dataclasses as dc

    from rlhf_jax import scripts
    from rlhf_jax.configs import ConfigError
    from rlhf_jax.stages.common import read_config
    from rlhf_jax.stages.offline import OfflineConfig
    from rlhf_jax.stages.pipeline import PipelineConfig
    from rlhf_jax.stages.reward import RewardConfig

    def fake_run(script, cfg, out):   # the last stage records its upstream's config
        if script in ("dpo", "ppo"):
            cfg = dc.replace(cfg, reward=read_config(cfg.reward_dir, RewardConfig))
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps(dc.asdict(cfg), default=str))
        (out / "summary.json").write_text(json.dumps({"stage": out.name}))

    monkeypatch.setattr(scripts, "run", fake_run)
    pipeline, out = load("pipeline"), tmp_path / "run"
    dpo, ipo = OfflineConfig(), OfflineConfig(loss="ipo")
    assert pipeline.run(PipelineConfig(), out, final=("dpo", "dpo", dpo))["stage"] == "dpo"
    with pytest.raises(ConfigError, match="other settings than this command's: beta"):
        pipeline.run(PipelineConfig(), out, final=("dpo", "dpo", dc.replace(dpo, beta=0.5)))
    assert pipeline.run(PipelineConfig(), out, final=("ipo", "dpo", ipo))["stage"] == "ipo"
    assert pipeline.run(PipelineConfig(), out, final=("dpo", "dpo", dpo))["stage"] == "dpo"
