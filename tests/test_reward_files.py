"""``experiments/reward.py --data hh-rlhf|summarize``: a reward model trained on human preference
files from an imported checkpoint, end to end on tiny fixtures (``tests/fixtures/hh_rlhf_split``,
``summarize_split``: pairs derived from the parser fixtures, where the chosen response always
answers and the rejected one refuses or says nothing — a signal a tiny model learns in a few
steps), with GPT-2's byte-level BPE as the checkpoint's ``tokenizer.json``."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax.data.tokenizers import GPT2Tokenizer, WordTokenizer
from rlhf_jax.models import create_model, preset
from rlhf_jax.models.hf import load_pretrained, save_pretrained
from rlhf_jax.scripts import load
from rlhf_jax.stages.reward_files import encode_pairs, pairwise_metrics, shared_pairs

FIXTURES = Path(__file__).parent / "fixtures"
TRAIN = ["--steps", "40", "--batch-prompts", "8", "--optim.warmup-steps", "2",
         "--optim.learning-rate", "1e-2", "--log-every", "10", "--no-lm-readout",
         "--no-freeze-trunk", "--max-prompt-tokens", "24", "--max-response-tokens", "16"]


def _reward_main(argv):
    return load("reward").main(argv)


def _checkpoint(path: Path, family: str) -> Path:
    """A random 1-layer model (d_model 32, GPT-2's 50,257-token vocabulary) with GPT-2's
    ``tokenizer.json``."""
    tok = GPT2Tokenizer()
    cfg = preset("test" if family == "gpt2" else "llama-test", max_len=48, n_layers=1,
                 vocab_size=tok.vocab_size)
    model, params = create_model(cfg, jax.random.key(3))
    save_pretrained(path, model, params, tokenizer=tok)
    tok._tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "gpt2-tiny", "gpt2")


def _exported_train_rewards(export: Path, run: Path, name: str) -> tuple[np.ndarray, dict]:
    """The exported classifier's scores of the run's stored train pairs, and their arrays."""
    from rlhf_jax.data.tokenizers import HFTokenizer
    from rlhf_jax.evaluate import score_groups
    from rlhf_jax.stages.reward_files import read_records
    from rlhf_jax.stages.reward_model import make_score_fn

    rm, params = load_pretrained(export)
    arrays, _ = encode_pairs(HFTokenizer.from_pretrained(export),
                             read_records(run / "data", name, "train"),
                             prompt_tokens=24, response_tokens=16)
    return score_groups(jax.jit(make_score_fn(rm, prompt_len=24)), params, arrays), arrays


@pytest.fixture(scope="module")
def hh_run(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("hh") / "rm"
    export = out.parent / "export"
    summary = _reward_main(["--out", str(out), "--init-from", str(checkpoint), "--data",
                            "hh-rlhf", "--data-dir", str(FIXTURES / "hh_rlhf_split"),
                            "--export-hf", str(export), *TRAIN])
    return out, export, summary


def test_hh_reward_model_learns_the_fixture_signal(hh_run):
    """Trains from the checkpoint (no pretraining / SFT runs), beats chance on the test split,
    counts truncations, writes metrics.jsonl and the stored TFDS data set."""
    out, _, s = hh_run
    assert s["data/train_pairs"] == 24 and s["data/test_pairs"] == 8 and s["rm/pairs"] == 8
    assert s["rm/accuracy"] >= 0.75, s
    assert s["rm/train_accuracy"] >= 0.9, s
    assert s["rm/margin"] > 0 and np.isfinite(s["rm/norm_gain"])
    assert s["data/train_prompts_truncated"] > 0          # the multi-turn prompts exceed 24 tokens
    assert s["data/train_responses_truncated"] > 0        # the haiku exceeds 15 tokens + EOS
    assert s["data/train_prompt_turns_truncated"] == 0    # at most 3 turns < the builder's 8
    assert not (out / "sft").exists() and not (out / "pretrain").exists()
    assert json.loads((out / "summary.json").read_text())["rm/accuracy"] == s["rm/accuracy"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 40
    assert (out / "data" / "hh_rlhf" / "1.1.0" / "dataset_info.json").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["init_from"]["files"]) == {"config.json", "model.safetensors",
                                                "tokenizer.json"}
    assert (s["data/test_pairs_in_train"], s["data/train_pairs_identical_after_truncation"]) == (
        0, 0)                                            # counted on hand-worked pairs below


def test_hh_run_resumes_and_exports_a_sequence_classifier(hh_run, checkpoint):
    """A rerun on the finished directory gives the same summary; the exported classifier, read
    back, scores like the trained RM (its normalisation folded in: train rewards mean 0)."""
    out, export, s = hh_run
    again = _reward_main(["--out", str(out), "--init-from", str(checkpoint), "--data", "hh-rlhf",
                          "--data-dir", str(FIXTURES / "hh_rlhf_split"), "--export-hf",
                          str(export), *TRAIN])
    assert again["rm/accuracy"] == s["rm/accuracy"] and again["rm/margin"] == s["rm/margin"]
    assert json.loads((export / "config.json").read_text())["architectures"] == [
        "GPT2ForSequenceClassification"]
    assert (export / "tokenizer.json").exists() and s["export/score_shift"] == 0.0
    assert s["export/pad_is_eos"] is True   # GPT-2 pads with <|endoftext|>: said in the summary
    rewards, arrays = _exported_train_rewards(export, out, "hh_rlhf")
    assert abs(rewards.mean()) < 1e-3 and abs(rewards.std() - 1.0) < 1e-3
    assert pairwise_metrics(rewards, arrays["ranking"])["accuracy"] == s["rm/train_accuracy"]


def test_summarize_reward_model_from_a_llama_family_checkpoint(tmp_path):
    """Summarize-from-feedback pairs, a Qwen2-style checkpoint; its export (RMSNorm: no bias to
    hold a constant) scores the normalised rewards shifted by the reported constant."""
    ckpt = _checkpoint(tmp_path / "ckpt", "llama")
    out, export = tmp_path / "rm", tmp_path / "export"
    s = _reward_main(["--out", str(out), "--init-from", str(ckpt), "--data", "summarize",
                      "--data-dir", str(FIXTURES / "summarize_split"), "--export-hf",
                      str(export), *TRAIN, "--steps", "20", "--batch-prompts", "4"])
    assert s["data/train_pairs"] == 12 and s["data/test_pairs"] == 4
    assert np.isfinite(s["rm/accuracy"]) and np.isfinite(s["rm/margin"])
    assert s["data/train_prompts_truncated"] > 0
    rewards, arrays = _exported_train_rewards(export, out, "summarize_from_feedback")
    assert abs(rewards.mean() + s["export/score_shift"]) < 1e-3
    assert abs(rewards.std() - 1.0) < 1e-3
    assert pairwise_metrics(rewards, arrays["ranking"])["accuracy"] == s["rm/train_accuracy"]


def test_a_bad_row_names_file_line_and_field(checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "hh_rlhf_prompt_mismatch.jsonl", data / "train.jsonl")
    shutil.copy(FIXTURES / "hh_rlhf_split" / "test.jsonl.gz", data / "test.jsonl.gz")
    with pytest.raises(SystemExit) as exc:
        _reward_main(["--out", str(tmp_path / "rm"), "--init-from", str(checkpoint), "--data",
                      "hh-rlhf", "--data-dir", str(data), *TRAIN])
    assert exc.value.code == 2
    assert re.search(r"error: .*train\.jsonl: line 2: field 'rejected': does not share the "
                     "prompt", capsys.readouterr().err)



def test_a_checkpoint_refused_at_run_time_leaves_a_run_that_starts_afresh(checkpoint, tmp_path,
                                                                          capsys):
    """The checkpoint is read before the data set is prepared: one refused at run time leaves
    no work in the run directory, so the rerun with it fixed is not refused as a resumed run
    whose checkpoint changed (README: a bad checkpoint, fixed, reruns on the same directory)."""
    from rlhf_jax.runs import RunDir

    bad = tmp_path / "ckpt"
    shutil.copytree(checkpoint, bad)
    (bad / "generation_config.json").write_text("{not json")
    out = tmp_path / "rm"
    i = TRAIN.index("--optim.learning-rate")
    default_lr = TRAIN[:i] + TRAIN[i + 2:]
    with pytest.raises(SystemExit) as exc:
        _reward_main(["--out", str(out), "--init-from", str(bad), "--data", "hh-rlhf",
                      "--data-dir", str(FIXTURES / "hh_rlhf_split"), *default_lr])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "generation_config.json: not valid JSON" in err
    # the reward stage's default learning rate (the task's, from scratch) is warned about
    assert "optim.learning_rate 0.0005 is this stage's default" in err
    assert not RunDir(out).started(), sorted(p.name for p in out.rglob("*") if p.is_file())

@pytest.mark.parametrize("case, field, message", [
    ("no_init_from", "sft.pretrain.init_from", "give --init-from CKPT"),
    ("no_tokenizer", "sft.pretrain.init_from", "has no tokenizer.json"),
    ("no_data_dir", "data_dir", "give --data-dir DIR"),
    ("missing_split", "data_dir", "expected one of test.jsonl, test.jsonl.gz"),
    ("too_long", "max_response_tokens", "exceeds the checkpoint's context 48"),
    ("export_readout", "export_hf", "add --no-lm-readout"),
    ("simulated_data_dir", "data_dir", "only used with file data"),
])
def test_config_errors_name_the_field(case, field, message, checkpoint, tmp_path, capsys):
    """Refused before any work (exit status 2), the message naming the field."""
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    (bare / "tokenizer.json").unlink()
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(FIXTURES / "hh_rlhf_split" / "train.jsonl", half)
    hh = ["--data", "hh-rlhf", "--data-dir", str(FIXTURES / "hh_rlhf_split")]
    ckpt = ["--init-from", str(checkpoint)]
    argv = {"no_init_from": hh,
            "no_tokenizer": ["--init-from", str(bare), *hh],
            "no_data_dir": [*ckpt, "--data", "hh-rlhf"],
            "missing_split": [*ckpt, "--data", "hh-rlhf", "--data-dir", str(half)],
            "too_long": [*ckpt, *hh, "--max-prompt-tokens", "40"],
            "export_readout": [*ckpt, *hh, *TRAIN[-4:], "--export-hf", str(tmp_path / "x")],
            "simulated_data_dir": ["--data-dir", str(half)]}[case]
    with pytest.raises(SystemExit) as e:
        _reward_main(["--out", str(tmp_path / "rm"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"`{field}`" in err and message in err, err
    assert not (tmp_path / "rm").exists()


DPO_FILES = ["--reward.data", "hh-rlhf", "--reward.data-dir", str(FIXTURES / "hh_rlhf_split"),
             "--reward.max-prompt-tokens", "24", "--reward.max-response-tokens", "16",
             "--steps", "10", "--batch-prompts", "8", "--optim.warmup-steps", "2",
             "--optim.learning-rate", "1e-2", "--log-every", "5", "--beta", "0.1"]


def test_dpo_on_preference_files_from_a_checkpoint(checkpoint, tmp_path):
    """dpo.py on HH files from a checkpoint (no task, no SFT or reward stage): the policy and the
    reference start from it, the train pairs are learned, the test split is scored by the
    log-ratio log π/π_ref of chosen vs rejected, and the exported policy reads back as a causal
    LM whose log-ratios are the ones scored."""
    from rlhf_jax.data.tokenizers import HFTokenizer
    from rlhf_jax.stages.offline import precompute_logps
    from rlhf_jax.stages.reward_files import read_records

    out, export = tmp_path / "dpo", tmp_path / "export"
    s = load("dpo").main(["--out", str(out), "--init-from", str(checkpoint), *DPO_FILES,
                          "--export-hf", str(export)])
    assert (s["data/train_pairs"], s["data/test_pairs"], s["dpo/test_logratio_pairs"]) == (
        24, 8, 8)
    assert s["final/dpo/loss"] < np.log(2) and s["dpo/train_logratio_accuracy"] == 1.0
    assert s["dpo/test_logratio_accuracy"] >= 0.75, s
    policy, params = load_pretrained(export)
    ref, ref_params = load_pretrained(checkpoint)
    arrays, _ = encode_pairs(HFTokenizer.from_pretrained(export),
                             read_records(out / "data", "hh_rlhf", "test"),
                             prompt_tokens=24, response_tokens=16, eos_when_cut=False)
    ratios = precompute_logps(policy, params, arrays) - precompute_logps(ref, ref_params, arrays)
    m = pairwise_metrics(ratios, arrays["ranking"])
    np.testing.assert_allclose([m["accuracy"], m["margin"]], [s["dpo/test_logratio_accuracy"],
                               s["dpo/test_logratio_margin"]], rtol=1e-4)


def test_encode_pairs_truncates_prompts_left_and_responses_right():
    """Hand-worked: BOS = 1, EOS = 2, pad = 0; budgets 4 (prompt) and 3 (response)."""
    tok = WordTokenizer("a b c d e f".split())          # ids: a=3 b=4 c=5 d=6 e=7 f=8
    records = [{"prompt": "a b c d", "responses": ["e", "f e d"], "ranking": [1.0, 0.0]},
               {"prompt": "a", "responses": ["e f", "f"], "ranking": [0.0, 1.0]},
               {"prompt": "a", "responses": ["e f a", "e f b"], "ranking": [0.0, 1.0]}]
    arrays, counts = encode_pairs(tok, records, prompt_tokens=4, response_tokens=3)
    # the third pair differs past the budget: both responses are [e f eos], a tie for the RM
    np.testing.assert_array_equal(arrays["responses"][2], [[7, 8, 2], [7, 8, 2]])
    assert counts == {"prompts_truncated": 1, "responses_truncated": 3,
                      "pairs_identical_after_truncation": 1}
    # for a policy (DPO, as TRL): EOS only where it fits; "f e d" and both third responses
    # keep 3 tokens and no EOS, so the third pair is told apart again
    policy, counts = encode_pairs(tok, records, prompt_tokens=4, response_tokens=3,
                                  eos_when_cut=False)
    np.testing.assert_array_equal(policy["responses"], [[[7, 2, 0], [8, 7, 6]],
                                                        [[7, 8, 2], [8, 2, 0]],
                                                        [[7, 8, 3], [7, 8, 4]]])
    np.testing.assert_array_equal(policy["prompts"], arrays["prompts"])
    assert counts == {"prompts_truncated": 1, "responses_truncated": 3,
                      "pairs_identical_after_truncation": 0}
    first = {k: v[:2] for k, v in arrays.items()}
    assert shared_pairs(first, arrays) == 2 and shared_pairs(arrays, first) == 2
    assert shared_pairs({k: v[2:] for k, v in arrays.items()}, first) == 0
    # [bos a b c d] keeps its last 4 tokens; [bos a] is left-padded
    np.testing.assert_array_equal(arrays["prompts"][:2], [[3, 4, 5, 6], [0, 0, 1, 3]])
    np.testing.assert_array_equal(arrays["prompt_mask"][:2], [[1, 1, 1, 1], [0, 0, 1, 1]])
    # "f e d" keeps "f e", then EOS; the rest right-padded
    np.testing.assert_array_equal(arrays["responses"][:2], [[[7, 2, 0], [8, 7, 2]],
                                                            [[7, 8, 2], [8, 2, 0]]])
    np.testing.assert_array_equal(arrays["response_mask"][0], [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(arrays["ranking"], [[1, 0], [0, 1], [0, 1]])


def test_pairwise_metrics_hand_worked():
    rewards = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0], [5.0, 0.0]])
    ranking = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # last pair tied: out
    m = pairwise_metrics(rewards, ranking)
    assert m == {"accuracy": (1 + 0 + 0.5) / 3, "margin": (1.0 - 3.0 + 0.0) / 3, "pairs": 3}


def test_ppo_and_dpo_refuse_a_reward_model_without_a_task_policy(hh_run, checkpoint, tmp_path,
                                                                   capsys):
    """PPO / DPO go on from the task's SFT policy, which a file-data RM does not have: refused
    with the field named, for a finished run (``reward_dir``) or a config (``reward.data``)."""
    out, _, _ = hh_run
    for script, argv, field in (
            ("ppo", ["--reward-dir", str(out)], "reward_dir"),
            ("dpo", ["--reward-dir", str(out)], "reward_dir"),
            ("ppo", ["--init-from", str(checkpoint), "--reward.data", "hh-rlhf",
                     "--reward.data-dir", str(FIXTURES / "hh_rlhf_split"),
                     "--reward.max-prompt-tokens", "24", "--reward.max-response-tokens", "16"],
             "reward.data")):
        with pytest.raises(SystemExit) as e:
            load(script).main(["--out", str(tmp_path / script), *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"`{field}`: the reward model was trained on --data hh-rlhf" in err, err


def test_pad_is_eos_checks_every_eos_id():
    """An export whose pad id is one of the EOS ids is read one token earlier by transformers."""
    from types import SimpleNamespace

    from rlhf_jax.stages.reward_files import pad_is_eos

    assert pad_is_eos(GPT2Tokenizer())                                   # pads with <|endoftext|>
    assert not pad_is_eos(SimpleNamespace(pad_id=0, eos_id=2))
    assert pad_is_eos(SimpleNamespace(pad_id=7, eos_id=2, eos_ids=(2, 7)))
    assert not pad_is_eos(SimpleNamespace(pad_id=0, eos_id=2, eos_ids=(2, 7)))


def test_an_export_killed_mid_write_is_redone_by_the_rerun(checkpoint, tmp_path):
    """``kill -9`` while ``--export-hf`` writes the safetensors leaves its temporary file
    (``.model.safetensors.tmp``) in the export directory: the rerun of the same command exports
    again (it was refused as a directory holding other files)."""
    from rlhf_jax.configs import ConfigError
    from rlhf_jax.stages.reward import RewardConfig
    from rlhf_jax.sweep import parse_tokens

    export = tmp_path / "export"
    export.mkdir()
    (export / ".model.safetensors.tmp").write_bytes(b"partial")
    argv = ["--sft.pretrain.init-from", str(checkpoint), "--data", "hh-rlhf", "--data-dir",
            str(FIXTURES / "hh_rlhf_split"), *TRAIN, "--export-hf", str(export)]
    assert parse_tokens(RewardConfig, argv).export_hf == str(export)
    (export / "notes.txt").write_text("not an export's")
    with pytest.raises(ConfigError, match="holds notes.txt"):
        parse_tokens(RewardConfig, argv)


def test_a_batch_larger_than_the_training_prompts_is_warned_about(capsys):
    """``--batch-prompts`` beyond the training split repeats prompts within a step: said, with
    the field and both sizes; a batch that fits is silent, and the order is unchanged."""
    from rlhf_jax.data.batching import EpochOrder
    from rlhf_jax.stages.common import epoch_order

    order = epoch_order(3, 4, 0, "batch_prompts")
    assert "warning: batch_prompts 4 exceeds the 3 training prompts" in capsys.readouterr().err
    np.testing.assert_array_equal(order.indices(5), EpochOrder(3, 4, 0).indices(5))
    epoch_order(4, 4, 0, "batch_prompts")
    assert capsys.readouterr().err == ""


SFT_FILES = ["--data", "hh-rlhf", "--data-dir", str(FIXTURES / "hh_rlhf_split"),
             "--max-prompt-tokens", "24", "--max-response-tokens", "16", "--steps", "12",
             "--batch-size", "8", "--optim.warmup-steps", "2", "--optim.learning-rate", "1e-2",
             "--log-every", "4"]


def test_sft_on_preference_files_from_a_checkpoint(checkpoint, tmp_path):
    """sft.py on HH files from a checkpoint (no task, no pretraining): next-token loss on each
    train pair's preferred response only; the test split's preferred responses are scored by
    mean NLL per token before and after, and the exported policy reads them back the same."""
    from rlhf_jax.data.tokenizers import HFTokenizer
    from rlhf_jax.stages.offline import precompute_logps
    from rlhf_jax.stages.reward_files import preferred_responses, read_records

    out, export = tmp_path / "sft", tmp_path / "export"
    s = load("sft").main(["--out", str(out), "--init-from", str(checkpoint), *SFT_FILES,
                          "--export-hf", str(export)])
    assert (s["sft_examples"], s["data/test_pairs"]) == (24, 8)
    assert s["sft/test_nll"] < s["sft/test_nll_base"] - 1.0, s       # learned: nats per token
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12] and rows[-1]["sft/loss"] < rows[0]["sft/loss"]
    # an independent reading of the test score: the export, the stored records, NumPy sums
    arrays, _ = encode_pairs(HFTokenizer.from_pretrained(export),
                             read_records(out / "data", "hh_rlhf", "test"),
                             prompt_tokens=24, response_tokens=16, eos_when_cut=False)
    test = preferred_responses(arrays)
    policy, params = load_pretrained(export)
    assert s["sft/test_response_tokens"] == int(test["response_mask"].sum())
    np.testing.assert_allclose(-precompute_logps(policy, params, test).sum()
                               / s["sft/test_response_tokens"], s["sft/test_nll"], rtol=1e-5)


def test_preferred_responses_picks_the_higher_ranked_one():
    tok = WordTokenizer("a b c d e f".split())          # ids: a=3 b=4 c=5 d=6 e=7 f=8
    records = [{"prompt": "a", "responses": ["e", "f"], "ranking": [1.0, 0.0]},
               {"prompt": "b", "responses": ["e", "f f"], "ranking": [0.0, 1.0]}]
    arrays, _ = encode_pairs(tok, records, prompt_tokens=3, response_tokens=3,
                             eos_when_cut=False)
    from rlhf_jax.stages.reward_files import preferred_responses

    best = preferred_responses(arrays)
    np.testing.assert_array_equal(best["responses"], [[[7, 2, 0]], [[8, 8, 2]]])
    np.testing.assert_array_equal(best["response_mask"], [[[1, 1, 0]], [[1, 1, 1]]])
    np.testing.assert_array_equal(best["prompts"], arrays["prompts"])


def test_a_task_learning_rate_is_warned_about_only_at_a_from_scratch_default(capsys):
    """On files a stage fine-tunes a checkpoint: its config's default learning rate, the task's
    (SFT 2e-3, RM 5e-4), is warned about; a rate that was set, or DPO's 5e-5, is not."""
    from rlhf_jax.stages.file_checks import warn_task_learning_rate
    from rlhf_jax.stages.lm import SFTConfig
    from rlhf_jax.stages.offline import OfflineConfig
    from rlhf_jax.stages.reward import RewardConfig
    from rlhf_jax.train import OptimConfig

    assert warn_task_learning_rate(SFTConfig()) and warn_task_learning_rate(RewardConfig())
    err = capsys.readouterr().err
    assert "optim.learning_rate 0.002 is" in err and "optim.learning_rate 0.0005 is" in err
    set_lr = dataclasses.replace(SFTConfig(), optim=OptimConfig(learning_rate=1e-5))
    assert not warn_task_learning_rate(set_lr) and not warn_task_learning_rate(OfflineConfig())
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("script,flags,field", [
    ("dpo", ["--loss", "kto"], "loss"), ("dpo", ["--eval-every", "5"], "eval_every"),
    ("dpo", ["--reward-dir", "x"], "reward_dir"),
    ("dpo", ["--reward.steps", "500"], "reward.steps"),
    ("dpo", ["--reward.optim.learning-rate", "1"], "reward.optim.learning_rate"),
    ("dpo", ["--reward.no-lm-readout"], "reward.lm_readout"),
    ("dpo", ["--reward.export-hf", "x"], "reward.export_hf"),   # not the RM's readout advice
    ("sft", ["--ptx-coef", "0.5"], "ptx_coef"), ("sft", ["--pretrain-dir", "x"], "pretrain_dir"),
    ("sft", ["--pretrain.steps", "700"], "pretrain.steps"),
    ("sft", ["--demos-per-prompt", "2"], "demos_per_prompt"), ("sft", ["--steps", "0"], "steps")])
def test_policy_stages_on_preference_files_refuse_what_needs_a_task(checkpoint, tmp_path, capsys,
                                                                    script, flags, field):
    """DPO and SFT on files: a flag of the task's path is refused before any work, named."""
    with pytest.raises(SystemExit) as e:
        load(script).main(["--out", str(tmp_path / "d"), "--init-from", str(checkpoint),
                           *(DPO_FILES if script == "dpo" else SFT_FILES), *flags])
    assert e.value.code == 2 and f"`{field}`" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_policy_stages_on_preference_files_refuse_a_sequence_classifier(checkpoint, tmp_path,
                                                                         capsys, script):
    """A reward model's export is no policy: SFT or DPO from it would train its trunk with the
    embedding read as the LM head and export a classifier again; refused, naming the field."""
    rm = tmp_path / "rm-export"   # the config says what the checkpoint is (no weights read)
    rm.mkdir()
    shutil.copy(checkpoint / "tokenizer.json", rm)
    config = json.loads((checkpoint / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps(
        {**config, "architectures": ["GPT2ForSequenceClassification"], "num_labels": 1}))
    with pytest.raises(SystemExit) as e:
        load(script).main(["--out", str(tmp_path / "d"), "--init-from", str(rm),
                           *(DPO_FILES if script == "dpo" else SFT_FILES)])
    err = capsys.readouterr().err
    field = "pretrain.init_from" if script == "sft" else "reward.sft.pretrain.init_from"
    assert e.value.code == 2 and f"`{field}`" in err and "GPT2ForSequenceClassification" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("field", ["max_prompt_tokens", "max_response_tokens"])
def test_stages_on_the_task_refuse_the_file_token_budgets(field):
    """SFT and the reward stage on the task read its prompt_len / max_new_tokens: a file budget
    would be dropped."""
    from rlhf_jax.configs import ConfigError
    from rlhf_jax.stages.lm import SFTConfig
    from rlhf_jax.stages.reward import RewardConfig

    for cls in (SFTConfig, RewardConfig):
        with pytest.raises(ConfigError, match=f"`{field}`: only used with file data"):
            cls(**{field: 64})


def test_a_tokenizer_beyond_the_model_vocabulary_is_refused_before_the_data_set(tmp_path,
                                                                                  capsys):
    """A checkpoint whose tokenizer.json has more ids than the model embeds is refused naming
    that file, before the data set is built: the run has not started, so the rerun with the
    right checkpoint starts afresh (it used to fail at the token check, after the build, and the
    rerun was refused as 'init_from files changed')."""
    from rlhf_jax.runs import RunDir

    tok = GPT2Tokenizer()
    model, params = create_model(preset("test", max_len=48, n_layers=1, vocab_size=1000),
                                 jax.random.key(3))
    ckpt = tmp_path / "small-vocab"
    save_pretrained(ckpt, model, params, tokenizer=tok)
    tok._tok.save(str(ckpt / "tokenizer.json"))
    out = tmp_path / "sft"
    with pytest.raises(SystemExit) as e:
        load("sft").main(["--out", str(out), "--init-from", str(ckpt), *SFT_FILES])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "tokenizer.json: its 50257 ids exceed the 1000" in err, err
    assert not (out / "data").exists() and not RunDir(out).started()


def test_a_tokenizer_that_cannot_encode_the_data_is_an_error_naming_file_and_record(tmp_path,
                                                                                   capsys):
    """A word-level tokenizer.json without an [UNK] token (what a task model's export holds)
    meets a word it lacks: an error naming the tokenizer file and the record (file and line),
    not tokenizers' bare Exception; the data set built for it goes, so the run has not started
    and a rerun with another checkpoint starts afresh."""
    from rlhf_jax.runs import RunDir

    tok = WordTokenizer("say red : .".split())
    model, params = create_model(preset("test", max_len=48, n_layers=1,
                                        vocab_size=tok.vocab_size), jax.random.key(3))
    ckpt = tmp_path / "word-level"
    save_pretrained(ckpt, model, params, tokenizer=tok)
    out = tmp_path / "sft"
    with pytest.raises(SystemExit) as e:
        load("sft").main(["--out", str(out), "--init-from", str(ckpt), *SFT_FILES])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert re.search(r"word-level/tokenizer.json: cannot encode .*Missing \[UNK\].*in record "
                     r"'hh_rlhf_split/train:1'", err), err
    assert not RunDir(out).started()


def test_sft_on_preference_files_accepts_what_it_does(checkpoint):
    """``--ptx-coef 0`` says what SFT on files does (no replay), so it is no contradiction."""
    from rlhf_jax.stages.lm import PretrainConfig, SFTConfig

    cfg = SFTConfig(data="hh-rlhf", data_dir=str(FIXTURES / "hh_rlhf_split"), ptx_coef=0.0,
                    max_prompt_tokens=24, max_response_tokens=16,
                    pretrain=PretrainConfig(init_from=str(checkpoint)))
    assert cfg.ptx_coef == 0.0
