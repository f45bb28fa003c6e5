"""Offline preference stage (experiments/dpo.py) end to end on the session's reward run
(``reward_run`` in conftest.py)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.scripts import load

TINY_OFFLINE = ["--steps", "6", "--batch-prompts", "4", "--optim.warmup-steps", "1",
                "--log-every", "2", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def dpo_run(reward_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    summary = load("dpo").main(["--out", str(out), "--reward-dir", str(reward_run),
                                 *TINY_OFFLINE, "--eval-every", "3", "--optim.learning-rate",
                                 "1e-3"])
    return out, summary


def _rows(out):
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_end_to_end_summary_and_eval_rows(dpo_run):
    out, summary = dpo_run
    for key in ("gold/base", "gold/sft", "gold/dpo", "fabrication_rate/dpo", "accuracy/dpo",
                "unknown_rate/dpo", "fabrication_rate/sft", "win_rate/dpo_vs_sft",
                "wins/dpo_vs_sft", "ties/dpo_vs_sft", "losses/dpo_vs_sft", "win_rate/ceiling",
                "kl/dpo_vs_sft", "time_s/offline", "time_s/offline_eval", "time_s/reward",
                "final/dpo/loss", "final/dpo/accuracy"):
        assert key in summary, key
    n = summary["wins/dpo_vs_sft"] + summary["ties/dpo_vs_sft"] + summary["losses/dpo_vs_sft"]
    assert n == len((out / "samples_dpo.jsonl").read_text().splitlines())
    assert summary["kl/dpo_vs_sft"] > 0.0   # lr 1e-3: the policy moved
    rows = _rows(out)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    for r in rows:
        assert ("heldout/gold" in r) == (r["step"] % 3 == 0), r
        assert "dpo/loss" in r and "dpo/pairs" in r
    last = rows[-1]
    # the eval at the last step uses the final evaluation's protocol and key
    assert last["heldout/gold"] == summary["gold/dpo"]
    assert np.isclose(last["heldout/kl"], summary["kl/dpo_vs_sft"], rtol=1e-5)
    assert last["heldout/fabrication_rate"] == summary["fabrication_rate/dpo"]
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "dpo" and config["reward"]["sft_dir"]


def test_resume_is_bit_identical(dpo_run, reward_run, tmp_path):
    """Cut the run back to its step-3 checkpoint (as a kill would) and rerun: same metrics,
    eval rows included, and the same parameters."""
    import orbax.checkpoint as ocp

    full, _ = dpo_run
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "6")
    shutil.rmtree(cut / "params")
    (cut / "summary.json").unlink()
    again = load("dpo").main(["--out", str(cut), "--reward-dir", str(reward_run),
                               *TINY_OFFLINE, "--eval-every", "3", "--optim.learning-rate",
                               "1e-3"])
    assert (cut / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    assert again["gold/dpo"] == dpo_run[1]["gold/dpo"]
    with ocp.StandardCheckpointer() as c:
        a, b = c.restore(full / "params"), c.restore(cut / "params")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_other_losses_run(loss, reward_run, tmp_path):
    out = tmp_path / loss
    summary = load("dpo").main(["--out", str(out), "--reward-dir", str(reward_run),
                                 *TINY_OFFLINE, "--loss", loss])
    assert f"gold/{loss}" in summary and f"kl/{loss}_vs_sft" in summary
    assert np.isfinite(summary[f"final/{loss}/loss"])


def test_readme_hinge_loss_runs_through_the_unchanged_stage(reward_run, tmp_path):
    """README's walk-through: register one function, name it in the config, run the stage."""
    from test_readme import _hinge_block

    from rlhf_jax.losses.preference import PREFERENCE_LOSSES

    try:
        _hinge_block()
        out = tmp_path / "hinge"
        summary = load("dpo").main(["--out", str(out), "--reward-dir", str(reward_run),
                                     *TINY_OFFLINE, "--loss", "hinge", "--loss-args", "beta",
                                     "0.3", "delta", "1.0", "--optim.learning-rate", "1e-3"])
    finally:
        PREFERENCE_LOSSES.pop("hinge", None)
    assert "gold/hinge" in summary and summary["kl/hinge_vs_sft"] > 0.0
    rows = _rows(out)
    # at the start the policy is the reference: h = 0 and the hinge is delta = 1
    assert rows[0]["hinge/loss"] < 1.0 + 1e-6 and np.isfinite(rows[-1]["hinge/loss"])
    assert json.loads((out / "config.json").read_text())["loss_args"] == {"beta": 0.3,
                                                                          "delta": 1.0}


def test_recomputed_reference_equals_precomputed(reward_run):
    """The reference forwarded inside the step gives the same loss as the precomputed log-probs,
    and at the start (policy = reference) DPO's loss is log 2."""
    from rlhf_jax.configs import from_dict
    from rlhf_jax.stages.common import load_stage
    from rlhf_jax.stages.lm import SFTConfig
    from rlhf_jax.stages.offline import offline_loss_fn, precompute_logps
    from rlhf_jax.stages.reward import RewardConfig, preference_arrays, read_preferences
    from rlhf_jax.tasks import build_task

    rcfg = from_dict(RewardConfig, json.loads((reward_run / "config.json").read_text()))
    sft_cfg, model, params = load_stage(rcfg.sft_dir, SFTConfig, config_of=lambda c: c.pretrain)
    world = build_task(sft_cfg.pretrain.task)
    prefs = read_preferences(reward_run / "data", "train", world)
    data = preference_arrays(world.tokenizer, prefs, sft_cfg.pretrain.task,
                             max_len=sft_cfg.pretrain.model.max_len)
    data = {k: v[:6] for k, v in data.items()}
    data["lengths"] = data["response_mask"].sum(-1).astype(np.float32)
    data["ref_logps"] = precompute_logps(model, params, data, batch=4)   # padded last batch
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    hp = {"beta": 0.1, "label_smoothing": 0.0}
    pre, m = offline_loss_fn(params, batch, model=model, loss="dpo", hparams=hp)
    rec, _ = offline_loss_fn(params, batch, model=model, loss="dpo", hparams=hp,
                             ref_params=params)
    assert int(m["pairs"]) > 0
    np.testing.assert_allclose(float(pre), np.log(2.0), rtol=1e-5)
    np.testing.assert_allclose(float(rec), np.log(2.0), rtol=1e-5)
    moved = jax.tree.map(lambda x: x * 1.01, params)
    a, _ = offline_loss_fn(moved, batch, model=model, loss="dpo", hparams=hp)
    b, _ = offline_loss_fn(moved, batch, model=model, loss="dpo", hparams=hp, ref_params=params)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    assert abs(float(a) - np.log(2.0)) > 1e-4


@pytest.mark.parametrize("args, field", [
    (["--loss", "slic"], "loss"),
    (["--reference", "cached"], "reference"),
    (["--beta", "0"], "beta"),
    (["--label-smoothing", "0.5"], "label_smoothing"),
    (["--ipo-tau", "-1"], "ipo_tau"),
    (["--simpo-margin", "-0.5"], "simpo_margin"),
    (["--eval-every", "-1"], "eval_every"),
    (["--steps", "10", "--optim.warmup-steps", "20"], "warmup_steps"),
    (["--beta", "nan"], "beta"),
    (["--loss-args", "betaa", "0.2"], "loss_args.betaa"),
    (["--loss", "kto", "--loss-args", "lambda_desirabel", "2"], "loss_args.lambda_desirabel"),
])
def test_bad_config_fails_naming_the_field(args, field, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        load("dpo").main(["--out", str(tmp_path / "x"), *args])
    assert exc.value.code == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_reward_run_is_a_named_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        load("dpo").main(["--out", str(tmp_path / "d"), "--reward-dir", str(tmp_path / "no")])
    assert exc.value.code == 2 and "reward_dir" in capsys.readouterr().err


def test_help_lists_every_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        load("dpo").main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--reward-dir", "--loss", "--beta", "--label-smoothing", "--ipo-tau",
                 "--ipo-average-length", "--simpo-beta", "--simpo-margin", "--reference",
                 "--eval-every", "--optim.learning-rate", "--reward.steps"):
        assert flag in out, flag
