"""Bad input at the public entry points gets a clean error naming the field, file or row —
property-based (hypothesis) over configs and preference-data rows, the scripts' exit on bad files
(checkpoints, tokenizers, rows, export directories), plus token-range checks."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import typing
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_jax import cli
from rlhf_jax.configs import ConfigError, to_dict
from rlhf_jax.data.batching import check_tokens
from rlhf_jax.data.preference_formats import (PreferenceDataError, read_hh_rlhf,
                                              read_summarize_comparisons)
from rlhf_jax.data.tokenizers import WordTokenizer
from rlhf_jax.models import create_model, preset
from rlhf_jax.models.hf import file_digests, save_pretrained
from rlhf_jax.scripts import load
from rlhf_jax.stages.compare import CompareConfig
from rlhf_jax.stages.lm import PretrainConfig, SFTConfig
from rlhf_jax.stages.pipeline import PipelineConfig
from rlhf_jax.stages.ppo import PPOConfig
from rlhf_jax.stages.reward import RewardConfig
from rlhf_jax.sweep import SweepConfig

CONFIGS = (PretrainConfig, SFTConfig, RewardConfig, PPOConfig, PipelineConfig)
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _numeric_fields(cls, prefix=""):
    """``(dotted path, type)`` of every int/float leaf of a config class (nested configs too)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += _numeric_fields(t, f"{prefix}{f.name}.")
        elif t in (int, float):
            out.append((f"{prefix}{f.name}", t))
    return out


FIELDS = [(cls, path, t) for cls in CONFIGS for path, t in _numeric_fields(cls)]


def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")


def _parse(cls, args, tmp_path, capsys):
    """``(ok, stderr)``: the CLI parsed the arguments, or failed cleanly (exit code 2)."""
    try:
        cli.parse(cls, ["--out", str(tmp_path / "x"), *args])
    except SystemExit as e:
        assert e.code == 2, e.code
        return False, capsys.readouterr().err
    return True, ""


@SETTINGS
@given(case=st.sampled_from(FIELDS), data=st.data())
def test_every_numeric_config_field_rejects_nonsense_naming_the_field(case, data, tmp_path,
                                                                      capsys):
    """NaN / ±inf for a float, a negative value for an int and 2**32 or more for a seed are never
    valid settings: the CLI must refuse them before any work, naming that field."""
    cls, path, kind = case
    seed = ["4294967296", "99999999999999999999"] if path.endswith("seed") else []
    bad = data.draw(st.sampled_from(["nan", "inf", "-inf"] if kind is float else
                                    ["-1", "-7", *seed]))
    ok, err = _parse(cls, [f"{_flag(path)}={bad}"], tmp_path, capsys)
    assert not ok, f"{cls.__name__}: {path}={bad} was accepted"
    assert path.rsplit(".", 1)[-1] in err, err


SEEDS = [*[(cls, "seed") for cls in CONFIGS], (PretrainConfig, "task.world.seed"),
         (CompareConfig, "upstream_seed"), (CompareConfig, "seeds"), (SweepConfig, "seeds")]


@pytest.mark.parametrize("cls, path", SEEDS, ids=lambda x: getattr(x, "__name__", x))
def test_seeds_are_below_2_to_the_32(cls, path, tmp_path, capsys):
    """``jax.random.key`` keeps a seed's low 32 bits (2**32 would reuse seed 0's random streams,
    2**64 overflows): a seed of 2**32 or more is refused naming the field; 2**32 - 1 is a seed."""
    assert (jax.random.key_data(jax.random.key(2**32)) ==
            jax.random.key_data(jax.random.key(0))).all()
    many = path.endswith("seeds")
    for bad in ("4294967296", "99999999999999999999"):
        ok, err = _parse(cls, [_flag(path), *(["0"] if many else []), bad], tmp_path, capsys)
        assert not ok and f"{path.rsplit('.', 1)[-1]}`" in err and "[0, 2**32)" in err, err
    assert _parse(cls, [_flag(path), str(2**32 - 1)], tmp_path, capsys)[0]


@pytest.mark.parametrize("argv", [["--init-from", ""], ["--init-from="], ["--init-from", " "]])
def test_an_empty_init_from_is_refused(argv, tmp_path, capsys):
    """An unset shell variable (``--init-from "$CKPT"``) is not "no checkpoint": it is refused."""
    ok, err = _parse(SFTConfig, argv, tmp_path, capsys)
    assert not ok and "--init-from: empty path" in err, err


def test_a_prompt_len_shorter_than_the_task_s_prompts_is_refused_before_any_work(tmp_path,
                                                                              capsys):
    """The first to read a prompt too long for ``task.prompt_len`` was the evaluation after
    pretraining (a ValueError traceback), and the fixed flag is another config, so the trained
    run could not be resumed: refused before any work, naming the field."""
    out = tmp_path / "pt"
    with pytest.raises(SystemExit) as exc:
        load("pretrain").main([
            "--out", str(out), "--task.prompt-len", "3", "--steps", "2",
            "--optim.warmup-steps", "1", "--batch-size", "2", "--model.n-layers", "1",
            "--model.d-model", "16", "--model.n-heads", "2", "--model.d-ff", "32",
            "--task.world.n-real", "8", "--task.world.n-fictional", "8"])
    assert exc.value.code == 2
    assert re.search(r"config field `task.prompt_len`: the task's longest prompt .* is \d+ "
                     r"tokens \(BOS included\), more than prompt_len 3",
                     capsys.readouterr().err)
    assert not out.exists()


def test_a_max_new_tokens_shorter_than_the_demonstrations_is_refused_before_pretraining(
        tmp_path, capsys):
    """SFT's rows hold a demonstration in ``task.max_new_tokens``: one too short was found by
    SFT after pretraining (a ValueError traceback), and the fixed flag contradicted the finished
    pretraining run. Refused before the pretraining starts, naming the field."""
    out = tmp_path / "sft"
    with pytest.raises(SystemExit) as exc:
        load("sft").main([
            "--out", str(out), "--pretrain.task.max-new-tokens", "2", "--pretrain.steps", "2",
            "--pretrain.optim.warmup-steps", "1", "--pretrain.batch-size", "2",
            "--pretrain.model.n-layers", "1", "--pretrain.model.d-model", "16",
            "--pretrain.model.n-heads", "2", "--pretrain.model.d-ff", "32",
            "--pretrain.task.world.n-real", "8", "--pretrain.task.world.n-fictional", "8",
            "--steps", "2", "--optim.warmup-steps", "1", "--batch-size", "2"])
    assert exc.value.code == 2
    assert re.search(r"config field `task.max_new_tokens`: the task's demonstrations run to "
                     r"\d+ tokens", capsys.readouterr().err)
    assert not (out / "pretrain" / "checkpoints").exists()


_VALUE = st.one_of(st.integers(-10**6, 10**6).map(str), st.sampled_from(
    ["nan", "inf", "-inf", "0", "1e30", "-1e-30", "abc", "", "0.5", "3"]))


@SETTINGS
@given(cls=st.sampled_from(CONFIGS), data=st.data())
def test_random_config_overrides_parse_or_fail_cleanly(cls, data, tmp_path, capsys):
    """Any mixture of overrides either parses or exits with code 2 and an error message —
    never a traceback from inside the library."""
    fields = _numeric_fields(cls)
    picks = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=4, unique=True))
    args = [f"{_flag(p)}={data.draw(_VALUE)}" for p, _ in picks]
    ok, err = _parse(cls, args, tmp_path, capsys)
    assert ok or err.strip(), args


@pytest.mark.parametrize("args, field", [
    (["--ppo.kl-coef=-0.1"], "kl_coef"),                                  # negative β
    (["--ppo.prompts-per-iter", "10", "--ppo.minibatches", "4"], "minibatches"),
    (["--reward.sft.pretrain.task.max-new-tokens", "500"], "max_new_tokens"),   # beyond context
    (["--ppo.epochs", "0"], "epochs"),
])
def test_named_inconsistent_ppo_configs(args, field, tmp_path, capsys):
    ok, err = _parse(PPOConfig, args, tmp_path, capsys)
    assert not ok and field in err, err


# --------------------------------------------------------------------------- files, on the CLI
FIXTURES = Path(__file__).parent / "fixtures"
HH = ["--data", "hh-rlhf", "--no-lm-readout", "--max-prompt-tokens", "24",
      "--max-response-tokens", "16"]


def _checkpoint(path: Path) -> Path:
    """A tiny GPT-2 checkpoint (context 48) with a word-level ``tokenizer.json``."""
    model, params = create_model(preset("test", max_len=48, n_layers=1), jax.random.key(0))
    save_pretrained(path, model, params, tokenizer=WordTokenizer("a b".split()))
    return path


def _main(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """``(exit code, stderr)`` of ``experiments/<script>.py`` refusing ``argv``."""
    with pytest.raises(SystemExit) as e:
        load(script).main(argv)
    return e.value.code, capsys.readouterr().err


def test_bad_checkpoints_tokenizers_and_rows_exit_cleanly(tmp_path, capsys):
    """A checkpoint's config.json that is no JSON object (``CheckpointError``, while parsing and
    while running), an unreadable tokenizer.json (``TokenizerError``) and a malformed preference
    row (``PreferenceDataError``) end a script like a bad flag: ``error: …`` naming the file,
    exit code 2. Any other error is a bug and keeps its traceback."""
    listed = _checkpoint(tmp_path / "listed")
    (listed / "config.json").write_text("[1]")
    bare = tmp_path / "bare"
    shutil.copytree(listed, bare)
    (bare / "tokenizer.json").unlink()
    tok = _checkpoint(tmp_path / "tok")
    (tok / "tokenizer.json").write_text("{not json")
    rows = tmp_path / "rows"
    rows.mkdir()
    shutil.copy(FIXTURES / "hh_rlhf_prompt_mismatch.jsonl", rows / "train.jsonl")
    shutil.copy(FIXTURES / "hh_rlhf_split" / "test.jsonl.gz", rows / "test.jsonl.gz")
    hh = [*HH, "--data-dir", str(FIXTURES / "hh_rlhf_split")]
    for script, argv, message in (
            ("sft", ["--init-from", str(bare)], f"{bare / 'config.json'}: expected a JSON object"),
            ("reward", [*hh, "--init-from", str(listed)],
             f"{listed / 'config.json'}: expected a JSON object"),
            ("sft", ["--init-from", str(tok)], f"{tok / 'tokenizer.json'}: not a readable HF "
                                                "tokenizer"),
            ("reward", [*HH, "--init-from", str(_checkpoint(tmp_path / "ok")), "--data-dir",
                        str(rows)], f"{rows / 'train.jsonl'}: line 2: field 'rejected'")):
        code, err = _main(script, ["--out", str(tmp_path / script), *argv], capsys)
        assert code == 2 and f"error: {message}" in err, (script, argv, err)

    def broken(cfg, out):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        cli.main(PretrainConfig, broken, ["--out", str(tmp_path / "bug")])


def test_export_hf_overwrites_neither_the_checkpoint_nor_the_run(tmp_path, capsys):
    """``--export-hf`` is refused before any work, naming the field and the directory, when it is
    the ``--init-from`` checkpoint, the run directory or inside or around it, or a directory of
    other files; a directory holding an export is reused only by the run that wrote it."""
    ckpt = _checkpoint(tmp_path / "ckpt")
    digests = file_digests(ckpt)
    out, other = tmp_path / "runs" / "rm", tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    argv = ["--out", str(out), "--init-from", str(ckpt), *HH, "--data-dir",
            str(FIXTURES / "hh_rlhf_split")]
    for export, message in ((ckpt, "is the --init-from checkpoint"),
                            (out, "is the run directory"), (out / "hf", "is the run directory"),
                            (out.parent, "is the run directory"), (other, "holds notes.txt")):
        code, err = _main("reward", [*argv, "--export-hf", str(export)], capsys)
        assert code == 2 and f"`export_hf`: {export} {message}" in err, err
    assert file_digests(ckpt) == digests and (other / "notes.txt").read_text() == "mine"
    assert not out.parent.exists()
    # a directory holding an export: another run's, until the run directory records it
    export = tmp_path / "export"
    export.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (export / name).write_text("{}")
    _, cfg = cli.parse(RewardConfig, [*argv, "--export-hf", str(export)])
    with pytest.raises(ConfigError, match="`export_hf`: .* holds an export, not of the run in"):
        cfg.check_run_dir(out)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg)))
    cfg.check_run_dir(out)      # a rerun of the run that exported there: exports again


# --------------------------------------------------------------------------- data rows
_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=8)


def _hh_row():
    dialogue = st.builds(lambda h, a: f"\n\nHuman: {h}\n\nAssistant: {a}",
                         st.text(max_size=10), st.text(max_size=10))
    return st.one_of(
        _JSONISH,
        st.fixed_dictionaries({"chosen": st.one_of(dialogue, _JSONISH),
                               "rejected": st.one_of(dialogue, _JSONISH)}),
        st.fixed_dictionaries({"chosen": dialogue}))


def _summarize_row():
    text = st.one_of(st.text(max_size=8), _JSONISH)
    return st.one_of(_JSONISH, st.fixed_dictionaries({
        "info": st.one_of(_JSONISH, st.fixed_dictionaries(
            {"subreddit": text, "title": text, "post": text})),
        "summaries": st.one_of(_JSONISH, st.lists(st.fixed_dictionaries({"text": text}),
                                                  max_size=3)),
        "choice": st.one_of(st.integers(-2, 3), _JSONISH)}))


def _check_file(reader, rows, tmp_path, raw_tail):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(r) for r in rows] + ([raw_tail] if raw_tail else [])
    path.write_text("\n".join(lines) + "\n")
    try:
        pairs, stats = reader(path)
    except PreferenceDataError as e:
        assert e.path == str(path) and e.line is not None and e.field, str(e)
        assert 1 <= e.line <= len(lines)
        assert str(path) in str(e) and f"line {e.line}" in str(e)
        return
    assert stats.examples == len(pairs) == (stats.rows - len(stats.errors)
                                            - stats.identical_pairs_skipped)
    for p in pairs:                      # nothing empty gets through
        assert p["prompt"].strip() and p["chosen"].strip() and p["rejected"].strip()


@SETTINGS
@given(rows=st.lists(_hh_row(), min_size=1, max_size=5),
       tail=st.sampled_from(["", "{not json", "\xff"]))
def test_hh_rlhf_rows_parse_or_fail_naming_file_line_field(rows, tail, tmp_path):
    _check_file(read_hh_rlhf, rows, tmp_path, tail)


@SETTINGS
@given(rows=st.lists(_summarize_row(), min_size=1, max_size=5),
       tail=st.sampled_from(["", "[1, 2", "null"]))
def test_summarize_rows_parse_or_fail_naming_file_line_field(rows, tail, tmp_path):
    _check_file(read_summarize_comparisons, rows, tmp_path, tail)


# --------------------------------------------------------------------------- token arrays
def test_tokens_out_of_vocabulary_range_are_named():
    data = {"tokens": np.array([[1, 2, 3], [4, 99, 0]]), "attention_mask": np.ones((2, 3))}
    check_tokens(data, vocab_size=100, source="sft data")
    data["tokens"][1, 1] = 100
    with pytest.raises(ValueError, match=r"sft data: field 'tokens' row 1 position 1 holds "
                                         r"token 100, outside the vocabulary \[0, 100\)"):
        check_tokens(data, vocab_size=100, source="sft data")
    data["tokens"][1, 1] = -3
    with pytest.raises(ValueError, match="token -3"):
        check_tokens(data, vocab_size=100, source="sft data")
    with pytest.raises(ValueError, match="field 'attention_mask'.*0/1"):
        check_tokens({"tokens": np.zeros((1, 2), int), "attention_mask": np.array([[1, 2]])},
                     vocab_size=100, source="x")


def test_pipeline_refuses_stage_flags_it_would_drop():
    """The pipeline seeds every stage and starts each from its own upstream stage: a stage seed,
    upstream directory or nested upstream config set on its command line would be ignored, so
    it is refused naming the field."""
    from rlhf_jax.stages.lm import SFTConfig
    from rlhf_jax.stages.pipeline import PipelineConfig
    from rlhf_jax.stages.ppo import PPOConfig
    from rlhf_jax.stages.reward import RewardConfig

    PipelineConfig(seed=3, sft=SFTConfig(seed=3))   # the same seed says nothing new
    for kw, field in (({"sft": SFTConfig(seed=3)}, "sft.seed"),
                      ({"ppo": PPOConfig(reward_dir="x")}, "ppo.reward_dir"),
                      ({"ppo": PPOConfig(reward=RewardConfig(steps=70))}, "ppo.reward")):
        with pytest.raises(ConfigError, match=rf"`{re.escape(field)}`"):
            PipelineConfig(**kw)
