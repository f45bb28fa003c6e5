"""Bad input at the public entry points gets a clean error naming the field, file or row —
property-based (hypothesis) over configs and preference-data rows, plus token-range checks."""

from __future__ import annotations

import dataclasses
import json
import typing

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_jax import cli
from rlhf_jax.data.batching import check_tokens
from rlhf_jax.data.preference_formats import (PreferenceDataError, read_hh_rlhf,
                                              read_summarize_comparisons)
from rlhf_jax.stages.lm import PretrainConfig, SFTConfig
from rlhf_jax.stages.pipeline import PipelineConfig
from rlhf_jax.stages.ppo import PPOConfig
from rlhf_jax.stages.reward import RewardConfig

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
    """NaN / ±inf for a float and a negative value for an int are never valid settings: the CLI
    must refuse them before any work, naming that field."""
    cls, path, kind = case
    bad = data.draw(st.sampled_from(["nan", "inf", "-inf"] if kind is float else ["-1", "-7"]))
    ok, err = _parse(cls, [f"{_flag(path)}={bad}"], tmp_path, capsys)
    assert not ok, f"{cls.__name__}: {path}={bad} was accepted"
    assert path.rsplit(".", 1)[-1] in err, err


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
    assert stats.examples == len(pairs) == stats.rows - len(stats.errors)
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
