"""Preference data: upstream-format parsers, TFDS array_record storage, grain batching.

Fixtures (tests/fixtures/) are tiny files in the upstream formats:

* ``hh_rlhf_tiny.jsonl`` (+ the same bytes gzipped as ``.jsonl.gz``): 5 HH-RLHF rows - single
  turn, two exchanges, an 11-turn prompt (truncated at the default 8 turns), unicode and a
  single-newline response, a response containing a blank line;
* ``summarize_comparisons_tiny.jsonl``: 3 TL;DR comparison rows (choice 0, 1, 1);
* ``hh_rlhf_*.jsonl`` / ``summarize_*.jsonl``: one malformed variant each, bad row last.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import pathlib
import pickle
import shutil
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import preference_formats as pf
from rlhf_jax.data import preference_batches as pb
from rlhf_jax.data import preference_records as records
from rlhf_jax.data import preferences as prefs
from rlhf_jax.data.preference_formats import PreferenceDataError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
HH = FIXTURES / "hh_rlhf_tiny.jsonl"
HH_GZ = FIXTURES / "hh_rlhf_tiny.jsonl.gz"
SUMMARIZE = FIXTURES / "summarize_comparisons_tiny.jsonl"
SYNC = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
THREADED = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)

tfds.disable_progress_bar()


def fixture(name: str) -> pathlib.Path:
    return FIXTURES / name


# ----------------------------------------------------------------------------------------------
# HH-RLHF parser


def test_hh_splits_prompt_and_final_responses():
    pairs, stats = pf.read_hh_rlhf(HH)
    assert [p["id"] for p in pairs] == [f"fixtures/hh_rlhf_tiny:{i}" for i in range(1, 6)]
    assert pairs[0] == {
        "id": "fixtures/hh_rlhf_tiny:1",
        "prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:",
        "chosen": " The capital of France is Paris.",
        "rejected": " I don't know.",
    }
    assert pairs[1]["prompt"] == ("\n\nHuman: Can you help me bake bread?\n\nAssistant: Sure. Do "
                                  "you have yeast?\n\nHuman: Yes, a packet of dry yeast."
                                  "\n\nAssistant:")
    assert pairs[1]["chosen"] == " Great, start by proofing it in warm water."
    assert pairs[1]["rejected"] == " Bread is hard. Buy some instead."
    assert pairs[3]["prompt"] == "\n\nHuman: Write a haiku about café mornings ☕\n\nAssistant:"
    assert pairs[3]["chosen"] == (" Steam curls from the cup,\nA quiet café at dawn —\n"
                                  "The city wakes.")
    # A blank line inside a response is not a turn boundary.
    assert pairs[4]["chosen"] == " Tip one: sleep.\n\nTip two: drink water."
    assert (stats.rows, stats.examples, stats.errors) == (5, 5, [])


def test_hh_untruncated_prompt_plus_response_is_the_upstream_text():
    rows = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()]
    pairs, _ = pf.read_hh_rlhf(HH, max_prompt_turns=None)
    for row, pair in zip(rows, pairs):
        assert pair["prompt"] + pair["chosen"] == row["chosen"]
        assert pair["prompt"] + pair["rejected"] == row["rejected"]


def test_hh_truncation_keeps_last_turns_and_is_counted():
    pairs, stats = pf.read_hh_rlhf(HH)  # default: 8 turns
    # 11 prompt turns (H1 A1 ... H5 A5 H6): the last 8 start with A2, which is dropped too.
    assert pairs[2]["prompt"] == (
        "\n\nHuman: Count with me: 3.\n\nAssistant: 3.\n\nHuman: Count with me: 4."
        "\n\nAssistant: 4.\n\nHuman: Count with me: 5.\n\nAssistant: 5."
        "\n\nHuman: Count with me: 6.\n\nAssistant:")
    assert (pairs[2]["chosen"], pairs[2]["rejected"]) == (" 6.", " Seven!")
    assert pf.count_hh_turns(pairs[2]["prompt"]) == 7
    assert (stats.prompts_truncated, stats.turns_dropped) == (1, 4)

    full, full_stats = pf.read_hh_rlhf(HH, max_prompt_turns=None)
    assert pf.count_hh_turns(full[2]["prompt"]) == 11
    assert full[2]["prompt"].endswith(pairs[2]["prompt"])  # truncation keeps a verbatim suffix
    assert full_stats.prompts_truncated == 0

    last_only, last_stats = pf.read_hh_rlhf(HH, max_prompt_turns=1)
    assert last_only[1]["prompt"] == "\n\nHuman: Yes, a packet of dry yeast.\n\nAssistant:"
    assert last_stats.prompts_truncated == 2  # rows 2 and 3 have more than one prompt turn


def test_hh_rows_that_part_early_or_hold_an_empty_response_are_kept_and_counted(tmp_path):
    """Upstream HH has rows whose dialogues part before the last turn, responses with turn
    markers in them, and empty final responses. Each was refused, so the first one ended a run on
    the real files; the prompt is now the shared text up to its last shared Assistant turn (as
    TRL's HH script splits), every pair's texts stay verbatim, and the oddities are counted."""
    h, a = "\n\nHuman:", "\n\nAssistant:"
    rows = [  # (chosen, rejected)
        (f"{h} Hi{a} Hello!{h} Bye{a} See you.", f"{h} Hi{a} Go away.{h} Bye{a} Fine."),
        (f"{h} Hi{a}", f"{h} Hi{a} Hello!"),                          # empty chosen
        (f"{h} Hi{a} Hello!", f"{h} Hi{a} Hello!{a} Hello again!"),   # a marker inside
        (f"{h} Hi{a} Hi!{h} you", f"{h} Hi{a} Hey."),                 # a Human turn inside
        (f"{h} Hi{a} Same.", f"{h} Hi{a} Same."),                     # identical: left out
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"chosen": c, "rejected": r}) + "\n" for c, r in rows))
    pairs, stats = pf.read_hh_rlhf(path, max_prompt_turns=None)
    assert [p["prompt"] for p in pairs] == [f"{h} Hi{a}"] * 4
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (f" Hello!{h} Bye{a} See you.", f" Go away.{h} Bye{a} Fine."), ("", " Hello!"),
        (" Hello!", f" Hello!{a} Hello again!"), (f" Hi!{h} you", " Hey.")]
    for (c, r), p in zip(rows, pairs):
        assert (p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]) == (c, r)
    assert (stats.examples, stats.identical_pairs_skipped, stats.empty_responses,
            stats.multi_turn_responses) == (4, 1, 1, 3)
    pairs, stats = pf.read_hh_rlhf(fixture("hh_rlhf_empty_response.jsonl"))
    assert (pairs[1]["chosen"], stats.empty_responses, stats.errors) == ("   ", 1, [])


def test_a_utf8_byte_order_mark_is_read_past(tmp_path):
    """A file saved with a UTF-8 BOM (as some editors write it) parses like one without: the
    BOM was refused as invalid JSON on line 1."""
    plain, _ = pf.read_hh_rlhf(HH)
    path = tmp_path / "hh_rlhf_tiny.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + HH.read_bytes())
    with_bom, stats = pf.read_hh_rlhf(path, id_prefix="fixtures/hh_rlhf_tiny")
    assert with_bom == plain and stats.errors == []


def test_truncate_hh_prompt_policy():
    prompt = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert pf.truncate_hh_prompt(prompt, 3) == (prompt, 0)
    assert pf.truncate_hh_prompt(prompt, 2) == ("\n\nHuman: c\n\nAssistant:", 2)  # no A-first
    assert pf.truncate_hh_prompt(prompt, 1) == ("\n\nHuman: c\n\nAssistant:", 2)
    assert pf.truncate_hh_prompt(prompt, None) == (prompt, 0)
    with pytest.raises(ValueError):
        pf.truncate_hh_prompt(prompt, 0)


def test_hh_gzip_gives_the_same_pairs():
    assert HH_GZ.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(HH_GZ.read_bytes()) == HH.read_bytes()
    plain, plain_stats = pf.read_hh_rlhf(HH)
    zipped, zipped_stats = pf.read_hh_rlhf(HH_GZ)
    assert zipped == plain  # same stem, same directory -> same ids
    assert zipped_stats.prompts_truncated == plain_stats.prompts_truncated == 1


def test_truncated_gzip_raises_a_located_error(tmp_path):
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(HH_GZ.read_bytes()[:-30])
    with pytest.raises(PreferenceDataError, match=r"broken.jsonl.gz: line \d+: field '\(file\)'"):
        pf.read_hh_rlhf(broken)


def test_error_keeps_its_location_through_pickling():
    err = PreferenceDataError("bad", path="f.jsonl", line=3, field="choice")
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.path, copy.line, copy.field) == (str(err), "f.jsonl", 3, "choice")


def test_gzip_is_detected_by_content_not_name(tmp_path):
    disguised = tmp_path / "train.jsonl"
    shutil.copy(HH_GZ, disguised)
    pairs, _ = pf.read_hh_rlhf(disguised, id_prefix="x")
    assert [p["chosen"] for p in pairs] == [p["chosen"] for p in pf.read_hh_rlhf(HH)[0]]
    assert pairs[0]["id"] == "x:1"


# ----------------------------------------------------------------------------------------------
# Summarize-from-feedback parser


def test_summarize_prompt_and_choice():
    pairs, stats = pf.read_summarize_comparisons(SUMMARIZE)
    assert pairs[0] == {
        "id": "fixtures/summarize_comparisons_tiny:1",
        # OpenAI's TL;DR query (tldr_task in summarize_from_feedback/utils/experiment_helpers.py)
        "prompt": ("SUBREDDIT: r/relationships\n\nTITLE: My roommate keeps eating my food\n\n"
                   "POST: We agreed to split groceries but he eats everything I buy.\n"
                   "What should I do?\n\nTL;DR:"),
        "chosen": " Roommate eats my food despite our deal; how do I fix it?",   # choice 0
        "rejected": " food gone roommate bad",
    }
    assert pairs[1]["prompt"].startswith("SUBREDDIT: r/personalfinance\n\nTITLE: Should I pay")
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == (      # choice 1
        " Should I invest my money?", " Low-rate car loan, emergency fund ready: invest or repay?")
    assert pairs[2]["prompt"] == pairs[0]["prompt"]  # same post, another comparison
    assert pairs[2]["chosen"] == " Roommate eats my food despite our deal; how do I fix it?"
    assert (stats.examples, stats.prompts_truncated) == (3, 0)


# ----------------------------------------------------------------------------------------------
# Malformed rows


MALFORMED = [
    # (reader, file, 1-based line, field, words in the detail)
    (pf.read_hh_rlhf, "hh_rlhf_bad_json.jsonl", 2, "(row)", "invalid JSON"),
    (pf.read_hh_rlhf, "hh_rlhf_missing_field.jsonl", 2, "rejected", "missing"),
    (pf.read_hh_rlhf, "hh_rlhf_wrong_type.jsonl", 3, "rejected", "expected str, got int"),
    (pf.read_hh_rlhf, "hh_rlhf_empty_prompt.jsonl", 2, "chosen", "empty prompt"),
    (pf.read_hh_rlhf, "hh_rlhf_no_assistant.jsonl", 2, "rejected", "no Assistant turn"),
    (pf.read_hh_rlhf, "hh_rlhf_prompt_mismatch.jsonl", 2, "rejected", "does not share the prompt"),
    (pf.read_summarize_comparisons, "summarize_bad_json.jsonl", 2, "(row)", "invalid JSON"),
    (pf.read_summarize_comparisons, "summarize_missing_post.jsonl", 2, "info.post", "missing"),
    (pf.read_summarize_comparisons, "summarize_cnndm.jsonl", 2, "info.article", "CNN/DM"),
    (pf.read_summarize_comparisons, "summarize_bad_choice.jsonl", 3, "choice", "0 or 1"),
    (pf.read_summarize_comparisons, "summarize_choice_wrong_type.jsonl", 2, "choice",
     "expected int, got str"),
    (pf.read_summarize_comparisons, "summarize_one_summary.jsonl", 2, "summaries",
     "expected 2 summaries"),
    (pf.read_summarize_comparisons, "summarize_empty_summary.jsonl", 2, "summaries[1].text",
     "empty text"),
]


@pytest.mark.parametrize("reader,name,line,field,detail", MALFORMED,
                         ids=[m[1] for m in MALFORMED])
def test_malformed_row_names_file_line_and_field(reader, name, line, field, detail):
    with pytest.raises(PreferenceDataError) as info:
        reader(fixture(name))
    err = info.value
    assert isinstance(err, ValueError)
    message = str(err)
    assert name in message and f"line {line}" in message and repr(field) in message
    assert detail in message
    assert (os.path.basename(err.path), err.line, err.field) == (name, line, field)


def test_collect_mode_reports_every_malformed_row(tmp_path):
    good = HH.read_text(encoding="utf-8").splitlines()
    bad = fixture("hh_rlhf_prompt_mismatch.jsonl").read_text(encoding="utf-8").splitlines()[1]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good[0], bad, "", "{not json", good[1], ""]) + "\n")
    pairs, stats = pf.read_hh_rlhf(path, on_error="collect")
    assert [p["id"] for p in pairs] == [f"{tmp_path.name}/mixed:1", f"{tmp_path.name}/mixed:5"]
    assert [(e.line, e.field) for e in stats.errors] == [(2, "rejected"), (4, "(row)")]
    assert (stats.rows, stats.examples, stats.blank_lines) == (4, 2, 2)
    with pytest.raises(PreferenceDataError, match="line 2"):
        pf.read_hh_rlhf(path)


def hh_row(chosen: str = " Paris.", rejected: str = " Rome.") -> str:
    prompt = "\n\nHuman: What is the capital of France?\n\nAssistant:"
    return json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected})


def summarize_row(first: str = " Summary one.", second: str = " Summary two.") -> str:
    row = json.loads(SUMMARIZE.read_text(encoding="utf-8").splitlines()[0])
    return json.dumps({**row, "summaries": [{"text": first}, {"text": second}]})


def write_lines(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def located(reader, path, **kwargs) -> PreferenceDataError:
    with pytest.raises(PreferenceDataError) as info:
        reader(path, **kwargs)
    assert str(path) in str(info.value)
    return info.value


def test_lone_surrogate_is_refused_naming_file_line_and_field(tmp_path):
    """TFDS cannot store such text (UnicodeEncodeError naming no file): refused when parsed."""
    hh = write_lines(tmp_path / "train.jsonl", [hh_row(), hh_row(chosen=" \ud800")])
    assert "\\ud800" in hh.read_text()  # as the JSON escape, which decodes to a lone surrogate
    err = located(pf.read_hh_rlhf, hh)
    assert (err.line, err.field) == (2, "chosen") and "lone surrogate" in str(err)
    pairs, stats = pf.read_hh_rlhf(hh, on_error="collect")
    assert len(pairs) == 1 and [(e.line, e.field) for e in stats.errors] == [(2, "chosen")]
    summ = write_lines(tmp_path / "comparisons.jsonl", [summarize_row(second=" \udfff x")])
    err = located(pf.read_summarize_comparisons, summ)
    assert (err.line, err.field) == (1, "summaries[1].text")


def test_deeply_nested_json_is_a_bad_row(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [hh_row(), "[" * 100_000, hh_row()])
    err = located(pf.read_hh_rlhf, path)
    assert (err.line, err.field) == (2, "(row)") and "nested too deeply" in str(err)
    pairs, stats = pf.read_hh_rlhf(path, on_error="collect")
    assert len(pairs) == 2 and [e.line for e in stats.errors] == [2]


def test_duplicate_json_keys_are_refused_naming_the_key(tmp_path):
    row = hh_row()
    twice = row.replace('{"chosen": ', '{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y", '
                                       '"chosen": ', 1)
    assert json.loads(twice) == json.loads(row)  # what plain JSON decoding would accept
    path = write_lines(tmp_path / "train.jsonl", [row, twice])
    err = located(pf.read_hh_rlhf, path)
    assert (err.line, err.field) == (2, "(row)") and "duplicate key 'chosen'" in str(err)
    nested = summarize_row().replace('"post": ', '"post": "other", "post": ', 1)
    err = located(pf.read_summarize_comparisons,
                  write_lines(tmp_path / "comparisons.jsonl", [nested]))
    assert err.line == 1 and "duplicate key 'post'" in str(err)


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n", gzip.compress(b"\n\n")],
                         ids=["empty", "blank-lines", "gzipped-blank-lines"])
def test_file_without_rows_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "test.jsonl"
    path.write_bytes(content)
    for reader in (pf.read_hh_rlhf, pf.read_summarize_comparisons):
        err = located(reader, path)
        assert (err.path, err.line, err.field) == (str(path), None, "(file)")
        assert "no rows" in str(err)


def test_identical_responses_are_left_out_and_counted(tmp_path):
    """A pair with chosen == rejected carries no preference: not trained on (it would count as a
    tie), not an error, but counted."""
    path = write_lines(tmp_path / "train.jsonl",
                       [hh_row(), hh_row(rejected=" Paris."), "", hh_row(" Lyon.", " Lyon.")])
    pairs, stats = pf.read_hh_rlhf(path)
    assert [p["id"] for p in pairs] == [f"{tmp_path.name}/train:1"]
    assert (stats.rows, stats.examples, stats.identical_pairs_skipped, stats.errors) == \
           (3, 1, 2, [])
    assert stats.as_dict()["identical_pairs_skipped"] == 2
    summ = write_lines(tmp_path / "comparisons.jsonl",
                       [summarize_row(), summarize_row(" Same.", " Same.")])
    pairs, stats = pf.read_summarize_comparisons(summ)
    assert len(pairs) == 1 and (stats.examples, stats.identical_pairs_skipped) == (1, 1)


def test_identical_pairs_left_out_are_not_counted_as_truncated(tmp_path):
    """The truncation counts (``data/*_prompt_turns_truncated``) cover the pairs kept only."""
    long = "".join(f"\n\nHuman: q{i}\n\nAssistant: a{i}" for i in range(6))
    prompt = long + "\n\nHuman: last\n\nAssistant:"   # 13 turns: 6 dropped at the default 8
    path = write_lines(tmp_path / "train.jsonl", [
        json.dumps({"chosen": prompt + " yes", "rejected": prompt + " no"}),
        json.dumps({"chosen": prompt + " same", "rejected": prompt + " same"})])
    pairs, stats = pf.read_hh_rlhf(path)
    assert (len(pairs), stats.identical_pairs_skipped) == (1, 1)
    assert (stats.prompts_truncated, stats.turns_dropped) == (1, 6)


def test_hh_truncation_always_keeps_a_human_turn_first(tmp_path):
    """Consecutive Assistant turns: the last ``max_turns`` turns may hold no Human turn; the prompt
    is then cut at the last Human turn before them, never at an Assistant turn."""
    prompt = "\n\nHuman: q\n\nAssistant: a1\n\nAssistant: a2\n\nAssistant:"
    for max_turns in (1, 2, 3):
        assert pf.truncate_hh_prompt(prompt, max_turns) == (prompt, 0)
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(
        {"chosen": prompt + " final", "rejected": prompt + " other"})])
    pairs, stats = pf.read_hh_rlhf(path, max_prompt_turns=1)
    assert pairs[0]["prompt"] == prompt and stats.prompts_truncated == 0
    longer = "\n\nHuman: q\n\nAssistant: a\n\nHuman: r" + prompt[len("\n\nHuman: q"):]
    assert pf.truncate_hh_prompt(longer, 2) == (longer[longer.index("\n\nHuman: r"):], 2)
    for n in range(2, 7):  # every prompt of n turns that starts with Human, every budget < n
        for rest in itertools.product(("Human", "Assistant"), repeat=n - 1):
            roles = ("Human",) + rest
            prompt = "".join(f"\n\n{r}: t{i}" for i, r in enumerate(roles)) + pf.ASSISTANT
            for max_turns in range(1, n):
                kept, dropped = pf.truncate_hh_prompt(prompt, max_turns)
                assert kept.startswith(pf.HUMAN) and prompt.endswith(kept), (roles, max_turns)
                assert pf.count_hh_turns(kept) == n - dropped and roles[dropped] == "Human"
                window = range(n - max_turns, n)
                if any(roles[i] == "Human" for i in window):  # the first Human turn in it
                    assert dropped == next(i for i in window if roles[i] == "Human")
                else:  # the last Human turn before it
                    assert "Human" not in roles[dropped + 1:]


# ----------------------------------------------------------------------------------------------
# K-wise records


def test_pair_to_record_and_ranked_pairs():
    record = records.pair_to_record({"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"})
    assert record["responses"] == ["c", "r"] and record["gold"] is None
    np.testing.assert_array_equal(record["ranking"], np.array([1, 0], np.float32))
    assert records.ranked_pairs(record["ranking"]) == [(0, 1)]
    assert records.ranked_pairs([2.0, 2.0, 0.0, 3.0]) == [(0, 2), (1, 2), (3, 0), (3, 1), (3, 2)]
    assert records.ranked_pairs([1.0, 1.0]) == []


@pytest.mark.parametrize("change,field", [
    ({"responses": ["only one"], "ranking": [1.0]}, "responses"),
    ({"ranking": [1.0, 0.0, 0.0]}, "ranking"),
    ({"ranking": [1.0, float("nan")]}, "ranking"),
    ({"gold": [0.5]}, "gold"),
    ({"responses": ["a", 3]}, "responses[1]"),
    ({"prompt": b"bytes"}, "prompt"),
    ({"id": ""}, "id"),
    ({"score": 1}, "score"),
    ({"response_ids": [[5, 6]]}, "response_ids"),                   # one list for 2 responses
    ({"response_ids": "5 6"}, "response_ids"),
    ({"response_ids": [[5, 6], [7.5]]}, "response_ids[1]"),         # not an integer
    ({"response_ids": [[5, 6], ["7"]]}, "response_ids[1]"),
    ({"response_ids": [[5, True], [7]]}, "response_ids[0]"),
    ({"response_ids": [[5, [6]], [7]]}, "response_ids[0]"),         # ragged
    ({"response_ids": [[5, -1], [7]]}, "response_ids[0]"),
    ({"response_ids": [[5], [2 ** 31]]}, "response_ids[1]"),        # past int32
])
def test_invalid_records_name_the_field(change, field):
    record = {"id": "r", "prompt": "p", "responses": ["a", "b"], "ranking": [1.0, 0.0], **change}
    with pytest.raises(PreferenceDataError) as info:
        records.validate_record(record, where="split 'train', record 0")
    assert info.value.field == field
    assert "record 0" in str(info.value) and repr(field) in str(info.value)


# ----------------------------------------------------------------------------------------------
# TFDS storage


SIMULATED = {
    "train": [
        {"id": "q0", "prompt": "2+2=", "responses": ["4", "5", "four"],
         "ranking": [1.0, 0.0, 1.0], "gold": [0.9, 0.1, 0.8]},            # K=3, tie, gold
        {"id": "q1", "prompt": "Name a colour", "responses": ["red", "blue", "green", "chair"],
         "ranking": [2.0, 2.0, 2.0, -1.5]},                               # K=4, no gold
        {"id": "q2", "prompt": "", "responses": ["a", ""], "ranking": [0.5, 0.5],
         "gold": [0.0, 0.25]},                                            # K=2, full tie
    ],
    "test": [
        {"id": "t0", "prompt": "é ☕", "responses": ["x", "y"], "ranking": [0.0, 1.0]},
    ],
}


def assert_records_equal(stored, expected):
    assert len(stored) == len(expected)
    for raw, want in zip(stored, expected):
        got, want = records.decode_record(raw), records.validate_record(want)
        assert {k: got[k] for k in ("id", "prompt", "responses")} == \
               {k: want[k] for k in ("id", "prompt", "responses")}
        np.testing.assert_array_equal(got["ranking"], want["ranking"])
        if want["gold"] is None:
            assert got["gold"] is None
        else:
            np.testing.assert_array_equal(got["gold"], want["gold"])
        assert got["response_ids"] == want["response_ids"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One directory holding HH, summarize and simulated data sets, built once."""
    root = tmp_path_factory.mktemp("tfds")
    prefs.HhRlhf(split_paths={"train": HH, "test": [HH_GZ]}, data_dir=root).download_and_prepare()
    prefs.SummarizeFromFeedback(split_paths={"train": [SUMMARIZE]},
                                data_dir=root).download_and_prepare()
    # One split from a list, one from a callable.
    prefs.build_preference_dataset({"train": SIMULATED["train"], "test": lambda: SIMULATED["test"]},
                                   root, name="toy_prefs", version="1.2.0",
                                   release_notes={"1.2.0": "toy data for tests"})
    return root


def test_hh_builder_round_trip(data_dir):
    pairs, _ = pf.read_hh_rlhf(HH)
    expected = [records.pair_to_record(p) for p in pairs]
    for split in ("train", "test"):
        source = prefs.load_preference_source(data_dir, "hh_rlhf", split)
        assert_records_equal(source, expected)
    info = tfds.builder_from_directory(os.path.join(data_dir, "hh_rlhf", "1.1.0")).info
    assert str(info.version) == "1.1.0" and info.file_format.value == "array_record"
    assert info.metadata["splits"]["train"]["prompts_truncated"] == 1
    assert info.metadata["build_spec"]["parser"] == {"max_prompt_turns": 8, "on_error": "raise"}
    assert info.metadata["build_spec"]["files"]["test"][0]["name"] == "hh_rlhf_tiny.jsonl.gz"


def test_summarize_builder_round_trip(data_dir):
    pairs, _ = pf.read_summarize_comparisons(SUMMARIZE)
    source = prefs.load_preference_source(data_dir, "summarize_from_feedback", "train")
    assert_records_equal(source, [records.pair_to_record(p) for p in pairs])
    assert source[1]["responses"][0] == b" Should I invest my money?"  # raw form: bytes


def test_simulated_builder_round_trips_kwise_records_with_ties_and_gold(data_dir):
    for split in ("train", "test"):
        source = prefs.load_preference_source(data_dir, "toy_prefs", split, version="1.2.0")
        assert_records_equal(source, SIMULATED[split])
    raw = prefs.load_preference_source(data_dir, "toy_prefs", "train")[1]
    assert raw["gold"].shape == (0,) and raw["ranking"].dtype == np.float32
    info = tfds.builder_from_directory(os.path.join(data_dir, "toy_prefs", "1.2.0")).info
    assert info.release_notes == {"1.2.0": "toy data for tests"}


def test_simulated_builder_round_trips_response_ids(tmp_path):
    """Sampled ids per response (ragged, one empty) beside a record without them; changed ids
    are different inputs."""
    with_ids = {"id": "s0", "prompt": "p", "responses": ["ab", "", "c"], "ranking": [2, 1, 0],
                "response_ids": [[97, 98], [], np.array([7], np.int64)]}
    split = [with_ids, {**SIMULATED["train"][0], "id": "s1"}]
    prefs.build_preference_dataset({"train": split}, tmp_path, name="toy_ids")
    source = prefs.load_preference_source(tmp_path, "toy_ids", "train")
    assert_records_equal(source, split)
    assert records.decode_record(source[0])["response_ids"] == [[97, 98], [], [7]]
    assert records.decode_record(source[1])["response_ids"] is None
    assert [a.dtype for a in source[0]["response_ids"]] == [np.int32] * 3
    changed = [{**with_ids, "response_ids": [[97, 98], [], [8]]}, split[1]]
    with pytest.raises(ValueError, match="built from different inputs"):
        prefs.build_preference_dataset({"train": changed}, tmp_path, name="toy_ids")


def test_a_data_set_stored_before_response_ids_reads_without_them(tmp_path, monkeypatch):
    """A data set prepared with the schema before ``response_ids`` (as in existing run
    directories) is read with its own features: records without ids, the same digest."""
    def old_features():
        spec = records.preference_features()
        return tfds.features.FeaturesDict({k: spec[k] for k in spec.keys()
                                           if k != "response_ids"})

    with monkeypatch.context() as m:
        m.setattr(prefs, "preference_features", old_features)
        m.setattr(prefs, "to_example", lambda r: {
            k: v for k, v in records.to_example(r).items() if k != "response_ids"})
        prefs.build_preference_dataset(SIMULATED, tmp_path, name="toy_old")
    features = json.loads((tmp_path / "toy_old" / "1.0.0" / "features.json").read_text())
    assert "response_ids" not in json.dumps(features)
    for split in ("train", "test"):
        source = prefs.load_preference_source(tmp_path, "toy_old", split)
        assert "response_ids" not in source[0]
        assert_records_equal(source, SIMULATED[split])
    prefs.build_preference_dataset(SIMULATED, tmp_path, name="toy_old")  # same inputs: reused


def test_rebuilding_reuses_same_inputs_and_rejects_different_ones(data_dir):
    prefs.build_preference_dataset(SIMULATED, data_dir, name="toy_prefs", version="1.2.0")
    changed = {**SIMULATED, "test": [{**SIMULATED["test"][0], "ranking": [1.0, 0.0]}]}
    with pytest.raises(ValueError, match="built from different inputs"):
        prefs.build_preference_dataset(changed, data_dir, name="toy_prefs", version="1.2.0")
    with pytest.raises(ValueError, match="max_prompt_turns"):
        prefs.HhRlhf(split_paths={"train": HH, "test": [HH_GZ]}, max_prompt_turns=2,
                     data_dir=data_dir).download_and_prepare()
    prefs.build_preference_dataset(changed, data_dir, name="toy_prefs", version="1.3.0")
    assert prefs.load_preference_source(data_dir, "toy_prefs", "test")[0]["ranking"][0] == 1.0


def test_builder_rejects_duplicate_ids_and_bad_records(tmp_path):
    with pytest.raises(PreferenceDataError, match="duplicate id 'fixtures/hh_rlhf_tiny:1'"):
        prefs.HhRlhf(split_paths={"train": [HH, HH_GZ]}, data_dir=tmp_path).download_and_prepare()
    with pytest.raises(PreferenceDataError, match=r"split 'train', record 0: field 'ranking'"):
        prefs.build_preference_dataset(
            {"train": [{"id": "a", "prompt": "p", "responses": ["x", "y"], "ranking": [1.0]}]},
            tmp_path, name="bad_prefs")
    with pytest.raises(PreferenceDataError, match="hh_rlhf_no_assistant.jsonl: line 2"):
        prefs.HhRlhf(split_paths={"train": fixture("hh_rlhf_no_assistant.jsonl")},
                     data_dir=tmp_path / "other").download_and_prepare()


def test_builder_can_collect_malformed_rows_into_metadata(tmp_path):
    builder = prefs.HhRlhf(split_paths={"train": fixture("hh_rlhf_prompt_mismatch.jsonl")},
                           on_error="collect", data_dir=tmp_path)
    builder.download_and_prepare()
    summary = builder.info.metadata["splits"]["train"]
    assert (summary["examples"], summary["malformed_rows_left_out"]) == (1, 1)
    assert "line 2: field 'rejected'" in summary["files"][0]["errors"][0]
    assert len(prefs.load_preference_source(tmp_path, "hh_rlhf", "train")) == 1


def test_builder_names_the_file_of_bad_text_and_of_a_split_without_pairs(tmp_path):
    """What TFDS would report naming no file (a surrogate it cannot encode, a split that yields
    nothing) is refused naming the file; identical pairs are counted in the metadata."""
    good = (FIXTURES / "hh_rlhf_split" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    split = tmp_path / "split"
    split.mkdir()
    train = write_lines(split / "train.jsonl", good[:3] + [hh_row(rejected=" Paris.")])

    def prepare(test_lines, name):
        write_lines(split / "test.jsonl", test_lines)
        builder = prefs.HhRlhf(split_paths=prefs.split_files(split), data_dir=tmp_path / name)
        builders.append(builder)
        builder.download_and_prepare()
        return builder

    builders = []
    for test_lines, match in [
            ([], r"test.jsonl: field '\(file\)': no rows"),
            (["", ""], r"test.jsonl: field '\(file\)': no rows"),
            ([hh_row(" Same.", " Same.")], r"test.jsonl: field '\(file\)': no pairs for split "
                                          r"'test': every row was left out \(0 malformed, 1 with"),
            ([good[3], hh_row(chosen=" \ud800")], r"test.jsonl: line 2: field 'chosen': not valid "
                                                  r"Unicode text: lone surrogate")]:
        with pytest.raises(PreferenceDataError, match=match):
            prepare(test_lines, "bad")
        if not test_lines:  # refused before any split is parsed or written
            assert builders[-1].parse_stats == {}
            assert not list((tmp_path / "bad").rglob("*.array_record*"))
    summary = prepare([good[3]], "ok").info.metadata["splits"]
    assert (summary["train"]["examples"], summary["train"]["identical_pairs_skipped"]) == (3, 1)
    assert summary["train"]["files"][0]["identical_pairs_skipped"] == 1
    assert summary["train"]["files"][0]["path"] == train.name
    assert summary["test"]["identical_pairs_skipped"] == 0


def test_no_tensorflow_needed(data_dir):
    assert "tensorflow" not in sys.modules


def test_load_missing_dataset_raises(data_dir):
    with pytest.raises(FileNotFoundError, match="no prepared data set 'nope'"):
        prefs.load_preference_source(data_dir, "nope", "train")


# ----------------------------------------------------------------------------------------------
# grain batching


RECORDS = [records.make_record(id=f"r{i}", prompt=f"p{i}", responses=[f"a{i}", f"b{i}"],
                             ranking=[1.0, 0.0]) for i in range(10)]


def ids(batch) -> list[str]:
    return [str(x) for x in batch["id"]]


def take(it, n: int) -> list[list[str]]:
    return [ids(next(it)) for _ in range(n)]


def test_loader_is_deterministic_by_seed():
    first = take(pb.preference_loader(RECORDS, batch_size=3, seed=7, read_options=SYNC), 8)
    again = take(pb.preference_loader(RECORDS, batch_size=3, seed=7, read_options=SYNC), 8)
    other = take(pb.preference_loader(RECORDS, batch_size=3, seed=8, read_options=SYNC), 8)
    assert first == again and first != other
    unshuffled = pb.preference_loader(RECORDS, batch_size=4, seed=0, shuffle=False,
                                         num_epochs=1, read_options=SYNC)
    assert [ids(b) for b in unshuffled] == [["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"],
                                            ["r8", "r9"]]


def test_each_epoch_covers_every_record_once():
    loader = pb.preference_loader(RECORDS, batch_size=3, seed=1, num_epochs=3,
                                     read_options=SYNC)
    batches = [ids(b) for b in loader]
    per_epoch = pb.steps_per_epoch(len(RECORDS), batch_size=3)
    assert per_epoch == 4 and len(batches) == 3 * per_epoch
    assert [len(b) for b in batches[:per_epoch]] == [3, 3, 3, 1]  # batches never straddle epochs
    epochs = [sum(batches[e * per_epoch:(e + 1) * per_epoch], []) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(r["id"] for r in RECORDS)
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch


@pytest.mark.parametrize("read_options", [SYNC, THREADED], ids=["sync", "prefetch"])
def test_get_state_set_state_resumes_with_the_same_batches(read_options):
    kwargs = dict(batch_size=3, seed=3, read_options=read_options)
    it = pb.preference_loader(RECORDS, **kwargs)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
    expected = take(it, 6)                          # crosses an epoch boundary
    resumed = pb.preference_loader(RECORDS, **kwargs)
    resumed.set_state(state)
    assert take(resumed, 6) == expected


def test_shards_are_disjoint_within_each_epoch():
    def shard_epochs(index: int, count: int, even: bool) -> list[set[str]]:
        it = pb.preference_loader(RECORDS, batch_size=2, seed=5, shard_index=index,
                                     shard_count=count, even_shards=even, num_epochs=2,
                                     read_options=SYNC)
        batches = [ids(b) for b in it]
        half = len(batches) // 2
        return [set(sum(batches[:half], [])), set(sum(batches[half:], []))]

    everything = {r["id"] for r in RECORDS}
    for even in (True, False):
        shards = [shard_epochs(i, 3, even) for i in range(3)]
        for epoch in range(2):
            parts = [s[epoch] for s in shards]
            assert sum(len(p) for p in parts) == len(set().union(*parts))  # disjoint
            if even:
                assert [len(p) for p in parts] == [3, 3, 3]   # 10 % 3 = 1 record left out
            else:
                assert set().union(*parts) == everything
    with pytest.raises(ValueError):
        pb.preference_loader(RECORDS, batch_size=2, seed=0, shard_index=3, shard_count=3)


def test_loader_over_tfds_source_with_map_hook(data_dir):
    source = prefs.load_preference_source(data_dir, "toy_prefs", "train", version="1.2.0")

    def tokenise(raw):  # stand-in for a tokenizer: fixed-K, fixed-length int arrays
        record = records.decode_record(raw)
        lengths = [len(r) for r in record["responses"][:2]]
        return {"id": record["id"], "lengths": np.asarray(lengths, np.int32),
                "prompt_len": len(record["prompt"])}

    it = pb.preference_loader(source, batch_size=2, seed=0, shuffle=False, num_epochs=1,
                                 map_fn=tokenise, read_options=SYNC)
    first, second = list(it)
    assert first["id"].tolist() == ["q0", "q1"]
    np.testing.assert_array_equal(first["lengths"], [[1, 1], [3, 4]])
    np.testing.assert_array_equal(first["prompt_len"], [4, 13])
    assert second["id"].tolist() == ["q2"]

    raw_batches = pb.preference_batches(source, batch_size=2, seed=0, shuffle=False)
    with pytest.raises(ValueError, match="has different shapes within a batch"):  # K = 3, 4
        raw_batches[0]


def test_loader_batches_stored_response_ids_as_they_are(tmp_path):
    """A stored data set whose records hold sampled ids (ragged, one record without) streams
    through the loader: ``response_ids`` is an object array of each record's lists (or None)."""
    split = [{"id": "s0", "prompt": "p", "responses": ["ab", "c"], "ranking": [1, 0],
              "response_ids": [[97, 98], [7]]},
             {"id": "s1", "prompt": "q", "responses": ["d", ""], "ranking": [0, 1],
              "response_ids": [[5], []]},
             {"id": "s2", "prompt": "r", "responses": ["e", "f"], "ranking": [1, 0]}]
    prefs.build_preference_dataset({"train": split}, tmp_path, name="toy_ids_loader")
    source = prefs.load_preference_source(tmp_path, "toy_ids_loader", "train")
    (batch,) = list(pb.preference_loader(
        source, batch_size=3, seed=0, shuffle=False, num_epochs=1, read_options=SYNC,
        map_fn=records.decode_record))
    assert batch["response_ids"].shape == (3,) and batch["response_ids"].dtype == object
    assert batch["response_ids"].tolist() == [[[97, 98], [7]], [[5], []], None]
    assert pb.collate_records([records.decode_record(source[2])])["response_ids"] is None


def test_collate_stacks_texts_as_objects():
    batch = pb.collate_records([RECORDS[0], RECORDS[1]])
    assert batch["responses"].shape == (2, 2) and batch["responses"].dtype == object
    assert batch["responses"][1, 0] == "a1" and batch["gold"] is None
    assert batch["ranking"].shape == (2, 2) and batch["ranking"].dtype == np.float32
