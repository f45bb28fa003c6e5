"""The sentiment task: the fortunes TFDS builder, the task BPE, the VADER judge and its labeller,
distinct-n, and ``experiments/sentiment.py`` end to end on the committed fixture directory.

``tests/fixtures/fortunes/`` is synthetic (made for these tests, in the fortune file format):
three prose files of 48 texts with "-- Author" lines, a text too short to give a prompt, a
duplicate across files, the same text under another author, an ASCII picture inside a prose file,
a non-prose file skipped by name (``ascii-art``) and a binary ``.dat`` index. Nothing here needs
the ``fortunes`` package.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.configs import ConfigError
from rlhf_jax.data import fortunes
from rlhf_jax.data.bpe import cached_bpe, train_bpe, wrap
from rlhf_jax.data.sentiment import SentimentConfig, SentimentTask, compound
from rlhf_jax.labeler import noise_ceiling, plackett_luce_ranking
from rlhf_jax.text_eval import distinct_n

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "fortunes"


def _task(tmp: Path, **kw) -> SentimentTask:
    return SentimentTask(SentimentConfig(fortunes_dir=str(FIXTURE), data_dir=str(tmp),
                                         vocab_size=320, heldout_every=5, **kw))


# ----------------------------------------------------------------------------- the builder
def test_attribution_is_stripped_and_inline_dashes_kept():
    assert fortunes.clean("Be kind.\n\t\t-- Ada Quill") == "Be kind."
    assert fortunes.clean("Be kind.\n\t\t-- Ada Quill, \"A Book\n\t\t   of Days\"") == "Be kind."
    assert fortunes.clean("Be kind.\n-- Ada Quill") == "Be kind."          # flush left, last line
    heinlein = "he is unbiased\n-- he hates all\ncreative people.\n\t\t-- R. H."
    assert fortunes.clean(heinlein) == "he is unbiased -- he hates all creative people."
    assert fortunes.clean("-- a text that starts with dashes\nand goes on") == (
        "-- a text that starts with dashes and goes on")


def test_builder_reads_splits_dedups_and_drops_non_prose(tmp_path):
    texts, counts = fortunes.read_texts(FIXTURE)
    assert counts == {"read": 52, "non_prose": 1, "duplicates": 2}
    assert {s for s, _ in texts} == {"misc", "stories", "wisdom"}     # no ascii-art, no .dat
    flat = [t for _, t in texts]
    assert len(flat) == len(set(flat)) == 49
    assert not any("--" in t or "Sailor" in t or "Someone Else" in t for t in flat)
    assert not any("o.o" in t or "lovely box" in t for t in flat)
    split = fortunes.load_fortunes(FIXTURE, tmp_path, heldout_every=5)
    assert sorted(split["train"] + split["heldout"]) == sorted(flat)
    assert not set(split["train"]) & set(split["heldout"])
    assert 0 < len(split["heldout"]) < len(split["train"])
    assert all(fortunes.split_of(t, 5) == s for s in split for t in split[s])
    assert fortunes.load_fortunes(FIXTURE, tmp_path, heldout_every=5) == split   # reused build


def test_builder_refuses_other_files_in_the_same_data_dir(tmp_path):
    fortunes.load_fortunes(FIXTURE, tmp_path / "data", heldout_every=5)
    other = tmp_path / "other"
    shutil.copytree(FIXTURE, other)
    (other / "wisdom").write_text("A different text altogether, long enough to count.\n%\n")
    with pytest.raises(ValueError, match="other fortune files"):
        fortunes.load_fortunes(other, tmp_path / "data", heldout_every=5)


def test_missing_directory_names_the_path_and_the_apt_command(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes") as e:
        fortunes.load_fortunes(missing, tmp_path / "data")
    assert str(missing) in str(e.value)
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        SentimentTask(SentimentConfig(fortunes_dir=str(missing), data_dir=str(tmp_path)))


def test_a_missing_fortunes_dir_is_bad_input_not_a_traceback(tmp_path, capsys):
    """``--task.options fortunes_dir DIR`` naming no fortunes: ``error: …`` and exit code 2
    before any work, as for every bad input (it used to end in a FileNotFoundError
    traceback)."""
    from rlhf_jax.scripts import load

    out = tmp_path / "pt"
    with pytest.raises(SystemExit) as e:
        load("pretrain").main(["--out", str(out), "--task.name", "sentiment", "--task.options",
                               "fortunes_dir", str(tmp_path / "none"), "data_dir",
                               str(tmp_path / "data")])
    assert e.value.code == 2
    assert re.search(r"error: fortunes directory .*none does not exist",
                     capsys.readouterr().err)
    assert not out.exists()


# ----------------------------------------------------------------------------- the tokenizer
def test_bpe_is_deterministic_cached_and_round_trips_sampled_ids(tmp_path):
    texts = [t for _, t in fortunes.read_texts(FIXTURE)[0]]
    assert train_bpe(texts, 320).to_str() == train_bpe(texts, 320).to_str()
    a = cached_bpe(texts, 320, tmp_path)
    files = list(tmp_path.glob("bpe_320_*.json"))
    assert len(files) == 1 and a.vocab_size == 320
    assert cached_bpe(texts, 320, tmp_path) is a                     # one instance per file
    assert train_bpe(texts, 320).to_str() == files[0].read_text()     # the cache: as trained
    fresh = wrap(train_bpe(texts, 320))
    assert fresh.to_json() == a.to_json()    # with the BOS template the stages' prompts follow
    word = " wonderful"
    canonical = fresh.encode(word)
    pieces = [i for ch in word for i in fresh.encode(ch)]            # a non-canonical spelling
    assert len(pieces) > len(canonical)
    assert fresh.decode(pieces + [fresh.eos_id, 0, 0]) == word
    assert fresh.encode(word) == pieces                              # the sampled ids come back
    assert wrap(train_bpe(texts, 320)).encode(word) == canonical     # a new tokenizer: canonical


# ----------------------------------------------------------------------------- the judge
def test_vader_compound_of_hand_worked_texts():
    # VADER: compound = s / sqrt(s² + 15) over the lexicon valences s (good: 1.9, bad: −2.5)
    assert compound("good") == pytest.approx(1.9 / np.sqrt(1.9 ** 2 + 15), abs=1e-4)
    assert compound("bad") == pytest.approx(-2.5 / np.sqrt(2.5 ** 2 + 15), abs=1e-4)
    assert compound("the table is made of wood") == 0.0
    assert compound("") == compound("   ") == 0.0


def test_judge_scores_the_continuation_only(tmp_path):
    task = _task(tmp_path)
    prompt = task.prompts("heldout")[0]
    sad = dataclasses.replace(prompt, text="a terrible, sad, awful failure")
    assert task.judge(sad, " and everyone was happy and grateful.").label == "positive"
    assert task.judge(prompt, " a terrible, sad mess.").label == "negative"
    j = task.judge(prompt, " while the clock kept ticking")
    assert (j.score, j.label) == (0.0, "neutral")
    m = task.summarize([prompt] * 3, [task.judge(prompt, t) for t in
                                      (" happy", " sad", " clock")])
    assert m["positive_rate"] == m["negative_rate"] == pytest.approx(1 / 3)
    assert m["gold"] == pytest.approx((compound("happy") + compound("sad")) / 3)


def test_prompts_follow_the_protocol(tmp_path):
    task = _task(tmp_path)
    tok = task.tokenizer
    for split in ("train", "heldout"):
        ps = task.prompts(split)
        assert ps
        for p in ps:
            assert 8 <= len(tok.encode(p.text)) <= 16
            assert len(tok.encode(p.info["text"])) >= 24
            assert p.info["text"].startswith(p.text)
            assert p.info["text"] in task.texts[split]
    assert not {p.info["text"] for p in task.prompts("train")} & {
        p.info["text"] for p in task.prompts("heldout")}
    assert task.pretraining_corpus() == list(task.texts["train"])
    with pytest.raises(NotImplementedError, match="no demonstrations"):
        task.demonstration(task.prompts("train")[0], np.random.default_rng(0))


def test_labeller_prefers_by_sigmoid_of_compound_gap_and_flips_coins_on_ties():
    tau, n = 0.25, 40000
    gold = np.tile(np.asarray([[0.6, 0.2, 0.0, 0.0]], np.float32), (n, 1))
    rank = plackett_luce_ranking(gold, tau, np.random.default_rng(0))
    assert np.mean(rank[:, 0] > rank[:, 1]) == pytest.approx(1 / (1 + np.exp(-0.4 / tau)),
                                                            abs=0.01)
    assert np.mean(rank[:, 2] > rank[:, 3]) == pytest.approx(0.5, abs=0.01)   # equal compounds
    p = 1 / (1 + np.exp(-np.asarray([0.4, 0.6, 0.6, 0.2, 0.2]) / tau))   # the 5 unequal pairs
    assert noise_ceiling(gold[:1], tau) == pytest.approx(np.mean(np.maximum(p, 1 - p)), rel=1e-6)


def test_distinct_n_counts_unique_word_ngrams_over_all_samples():
    texts = ["a b a b", "a b c", ""]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)        # a b c of a,b,a,b,a,b,c
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)        # ab, ba, bc of ab,ba,ab,ab,bc
    assert distinct_n([], 2) == 0.0


# ----------------------------------------------------------------------------- end to end
TINY = ["--pipeline.pretrain.model.d-model", "32", "--pipeline.pretrain.model.n-heads", "2",
        "--pipeline.pretrain.model.n-layers", "1",
        "--pipeline.pretrain.steps", "20", "--pipeline.pretrain.batch-size", "8",
        "--pipeline.pretrain.optim.warmup-steps", "2", "--pipeline.pretrain.log-every", "10",
        "--pipeline.reward.steps", "4", "--pipeline.reward.batch-prompts", "4",
        "--pipeline.reward.optim.warmup-steps", "1",
        "--pipeline.ppo.iterations", "2", "--pipeline.ppo.ppo.prompts-per-iter", "8",
        "--pipeline.ppo.ppo.minibatches", "2", "--pipeline.ppo.ppo.epochs", "1",
        "--pipeline.ppo.policy-optim.warmup-steps", "1",
        "--pipeline.ppo.value-optim.warmup-steps", "1", "--pipeline.ppo.best-of-n", "2"]

KEYS = ("gold/sft", "gold/rlhf", "win_rate/rlhf_vs_sft", "kl/rlhf_vs_sft", "kl/budget",
        "distinct_1/sft", "distinct_2/sft", "distinct_1/rlhf", "distinct_2/rlhf",
        "perplexity/rlhf_under_sft", "rm/gold_agreement", "rm/noise_ceiling")


@pytest.mark.slow
def test_sentiment_script_end_to_end_on_the_fixture(tmp_path):
    import jax

    from rlhf_jax import scripts
    from rlhf_jax.stages.common import load_stage
    from rlhf_jax.stages.lm import PretrainConfig, SFTConfig

    out = tmp_path / "run"
    options = ["fortunes_dir", str(FIXTURE), "data_dir", str(tmp_path / "data"),
               "vocab_size", "320", "heldout_every", "5"]
    summary = scripts.load("sentiment").main(
        ["--method", "ppo", "--out", str(out), "--pipeline.pretrain.task.options", *options,
         *TINY])
    for k in KEYS:
        assert np.isfinite(summary[k]), k
    assert summary["kl/budget"] == 3.0
    assert summary["bar/kl"] == (summary["kl/rlhf_vs_sft"] <= 3.0)
    assert json.loads((out / "summary.json").read_text())["win_rate/rlhf_vs_sft"] == (
        summary["win_rate/rlhf_vs_sft"])
    sft = [json.loads(x) for x in (out / "ppo" / "samples_sft.jsonl").read_text().splitlines()]
    rlhf = [json.loads(x) for x in (out / "ppo" / "samples_rlhf.jsonl").read_text().splitlines()]
    assert len(sft) == len(rlhf) == 4 * len({r["uid"] for r in sft})
    assert summary["distinct_2/sft"] == distinct_n([r["response"] for r in sft], 2)
    md = (out / "samples.md").read_text()
    assert sft[0]["uid"] in md and "| # | sft | score | RLHF | score |" in md
    # the starting policy is the pretrained model, unchanged
    _, _, pre = load_stage(out / "pretrain", PretrainConfig)
    _, _, start = load_stage(out / "sft", SFTConfig, config_of=lambda c: c.pretrain)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pre), jax.tree.leaves(start)))
    # a task without demonstrations refuses SFT steps
    with pytest.raises(ConfigError, match="no demonstrations"):
        scripts.load("sft").run(SFTConfig(steps=25, pretrain_dir=str(out / "pretrain")),
                                tmp_path / "sft25")

    # the default (--method dpo): DPO from the same reward run in place of PPO, reported in the
    # task's keys
    dpo_out = tmp_path / "dpo_run"
    dpo_out.mkdir()
    for stage in ("pretrain", "sft", "reward"):
        (dpo_out / stage).symlink_to(out / stage)
    dpo = scripts.load("sentiment").main(
        ["--out", str(dpo_out), "--pipeline.pretrain.task.options", *options,
         *TINY, "--offline.steps", "3", "--offline.batch-prompts", "4",
         "--offline.optim.warmup-steps", "1"])
    for k in KEYS:
        assert np.isfinite(dpo[k]), k
    assert not any("/dpo" in k for k in dpo)   # DPO's keys renamed to the task's
    assert dpo["gold/sft"] == summary["gold/sft"]   # the same start, prompts and samples
    stage = json.loads((dpo_out / "dpo" / "summary.json").read_text())
    assert dpo["win_rate/rlhf_vs_sft"] == stage["win_rate/dpo_vs_sft"]
    assert dpo["kl/rlhf_vs_sft"] == stage["kl/dpo_vs_sft"]
    rows = [json.loads(x) for x in (dpo_out / "dpo" / "samples_dpo.jsonl").read_text().split(
        "\n") if x]
    assert dpo["distinct_2/rlhf"] == distinct_n([r["response"] for r in rows], 2)
    assert not (dpo_out / "ppo").exists()


@pytest.mark.skipif(not Path(fortunes.DEFAULT_DIR).is_dir(),
                    reason="Debian's fortunes are not installed (apt-get install fortunes)")
def test_builder_on_the_installed_fortunes(tmp_path):
    split = fortunes.load_fortunes(fortunes.DEFAULT_DIR, tmp_path, heldout_every=10)
    n = len(split["train"]) + len(split["heldout"])
    assert n > 10000 and 0.07 < len(split["heldout"]) / n < 0.13
    assert not set(split["train"]) & set(split["heldout"])
    assert not any(t.endswith("-- Mark Twain") for s in split.values() for t in s)


def test_method_flag_puts_the_online_preset_in_the_ppo_stage():
    """``experiments/sentiment.py --method raft``: RAFT's preset (best of G = 16, 32 prompts,
    β 0.5) and learning rate in the PPO stage, every other stage and the iteration count the
    task's; later flags override the preset; ``dpo`` is the default config itself and ``ppo``
    the task's PPO settings."""
    from rlhf_jax import cli
    from rlhf_jax.rl.presets import raft_hparams
    from rlhf_jax.stages.online import split_method
    from rlhf_jax.stages.sentiment import PIPELINE, SentimentConfig, method_config

    assert method_config("dpo") == SentimentConfig() and SentimentConfig().last_stage == "dpo"
    assert method_config("ppo") == SentimentConfig(method="ppo")
    assert method_config("ppo").pipeline == PIPELINE and method_config("ppo").last_stage == "ppo"
    raft = method_config("raft").pipeline
    assert raft.ppo.ppo == raft_hparams(group_size=16, prompts_per_iter=32, kl_coef=0.5,
                                        no_eos_penalty=0.0)
    assert raft.ppo.policy_optim.learning_rate == 1e-4
    assert (raft.pretrain, raft.reward, raft.ppo.iterations) == (
        PIPELINE.pretrain, PIPELINE.reward, PIPELINE.ppo.iterations)
    method, argv = split_method(["--method", "raft", "--out", "x",
                                 "--pipeline.ppo.ppo.kl-coef", "0"], "dpo")
    _, cfg = cli.parse(SentimentConfig, argv, default=method_config(method))
    assert (cfg.pipeline.ppo.ppo.advantage, cfg.pipeline.ppo.ppo.kl_coef) == ("best", 0.0)
    # bad values name their field
    for bad, field in ((dict(kl_budget=0.0), "kl_budget"), (dict(shown_prompts=-1),
                       "shown_prompts"), (dict(method="nope"), "method"),
                       (dict(method="ipo"), "offline.loss")):
        with pytest.raises(ConfigError, match=field):
            SentimentConfig(**bad)
