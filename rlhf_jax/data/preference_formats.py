"""Parsers for pairwise preference data in its upstream file formats.

Each parser reads a local JSON-lines file (plain, or gzip-compressed: detected from the file's
magic bytes, not its name) and yields plain dicts::

    {"id": str, "prompt": str, "chosen": str, "rejected": str}

``prompt + chosen`` (and ``prompt + rejected``) reproduce the upstream text exactly unless the
prompt was truncated: responses keep their leading space (``" Paris."``), because the prompt ends
with the separator (``"Assistant:"`` or ``"TL;DR:"``).

``id`` is ``"{prefix}:{line}"`` with ``prefix = "{parent directory}/{file stem}"`` by default (for
example ``"helpful-base/train:17"``), so ids are stable for a given upstream file and do not
collide between the HH subsets, which all name their files ``train``/``test``.

Supported formats:

* **Anthropic HH-RLHF** (:func:`iter_hh_rlhf`): ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": ...}``. The prompt is the two dialogues' shared text up to and including their
  last shared ``"\\n\\nAssistant:"`` (almost always each one's final Assistant turn;
  :func:`parse_hh_row`); the responses are the rest. Long prompts are truncated (see
  :func:`truncate_hh_prompt`) and every truncation is counted in :class:`ParseStats`.
* **OpenAI summarize-from-feedback comparisons** (:func:`iter_summarize_comparisons`):
  ``{"info": {"post", "title", "subreddit", ...}, "summaries": [{"text"}, {"text"}],
  "choice": 0 | 1}``; the prompt is OpenAI's TL;DR query
  ``"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"`` (``tldr_task`` in
  ``summarize_from_feedback/utils/experiment_helpers.py``), the text the compared summaries were
  sampled after.

Malformed rows are never skipped silently; how errors name the file, line and field, what
``on_error="collect"`` keeps, and how rows with identical chosen and rejected responses are left
out and counted, is described in :mod:`rlhf_jax.data.preference_rows`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

from rlhf_jax.data.preference_rows import (OnError, ParseStats, PathLike, PreferenceDataError,
                                           PreferencePair, iter_pairs,
                                           preview, require, require_text)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
DEFAULT_MAX_PROMPT_TURNS = 8

_TURN_RE = re.compile(r"\n\n(Human|Assistant):")


# ----------------------------------------------------------------------------------------------
# Anthropic HH-RLHF


def _turn_starts(prompt: str) -> list[tuple[int, str]]:
    """``(offset, role)`` of each turn of a prompt, excluding its final empty Assistant slot."""
    body = prompt[: -len(ASSISTANT)]
    return [(m.start(), m.group(1)) for m in _TURN_RE.finditer(body)]


def count_hh_turns(prompt: str) -> int:
    """Number of Human/Assistant turns in an HH prompt (the trailing empty slot not counted)."""
    return len(_turn_starts(prompt))


def truncate_hh_prompt(prompt: str, max_turns: int | None) -> tuple[str, int]:
    """Keep only the last ``max_turns`` turns of an HH prompt; return ``(prompt, turns dropped)``.

    Truncation policy:

    * a *turn* is one ``"\\n\\nHuman: ..."`` or ``"\\n\\nAssistant: ..."`` segment of the prompt;
      the trailing ``"\\n\\nAssistant:"`` (where the response goes) is not a turn and is always
      kept;
    * if the prompt has more than ``max_turns`` turns, the oldest are dropped so that at most
      ``max_turns`` remain, and then leading Assistant turns are dropped too, so the truncated
      prompt still starts with ``"\\n\\nHuman:"`` (it may keep fewer than ``max_turns`` turns);
    * if none of the last ``max_turns`` turns is a Human turn (consecutive Assistant turns), the
      prompt is cut at the last Human turn before them instead, so it starts with a Human turn
      but keeps more than ``max_turns`` turns (or is kept whole, if that is its first turn);
    * the result is a verbatim suffix of the original prompt (no text is rewritten);
    * ``max_turns=None`` disables truncation.

    Callers count truncations: :func:`iter_hh_rlhf` adds them to ``ParseStats.prompts_truncated``.
    """
    if max_turns is None:
        return prompt, 0
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1 or None, got {max_turns}")
    turns = _turn_starts(prompt)
    if len(turns) <= max_turns:
        return prompt, 0
    humans = [i for i, (_, role) in enumerate(turns) if role == "Human"]
    first = next((i for i in humans if i >= len(turns) - max_turns), humans[-1] if humans else 0)
    return prompt[turns[first][0]:], first


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def parse_hh_row(row: Any, *, max_prompt_turns: int | None = DEFAULT_MAX_PROMPT_TURNS
                 ) -> tuple[str, str, str, int]:
    """Parse one HH-RLHF row into ``(prompt, chosen, rejected, prompt turns dropped)``.

    The prompt is the text both dialogues share, up to and including the last
    ``"\\n\\nAssistant:"`` inside it; each response is the rest of its dialogue, verbatim. In
    almost every row that is each dialogue's final Assistant turn (the prompt everything before
    it). Where the two dialogues part at an earlier turn (a few upstream rows), each response
    continues its dialogue from there, later turns included, as TRL's HH script keeps them; a
    response may also be empty (the labeller compared it all the same). Both are kept; the
    caller counts them (:func:`iter_hh_rlhf`).

    Errors are :class:`PreferenceDataError` naming the field (no file/line: see
    :func:`iter_hh_rlhf`): a dialogue that does not start with ``"\\n\\nHuman:"`` or has no
    Assistant turn, two dialogues that part before their first Assistant turn (no shared
    prompt), or a prompt with no text.
    """
    chosen_text = require(row, "chosen", str, "chosen")
    rejected_text = require(row, "rejected", str, "rejected")
    for text, field in ((chosen_text, "chosen"), (rejected_text, "rejected")):
        if not text.startswith(HUMAN):
            raise PreferenceDataError(f"dialogue must start with {HUMAN!r}, starts with "
                                      f"{preview(text[:20])}", field=field)
        if ASSISTANT not in text:
            raise PreferenceDataError(f"no Assistant turn (no {ASSISTANT!r} in the dialogue)",
                                      field=field)
    at = _first_difference(chosen_text, rejected_text)
    cut = chosen_text.rfind(ASSISTANT, 0, at)      # the last marker inside the shared text
    if cut < 0:
        raise PreferenceDataError(
            f"does not share the prompt of 'chosen': the dialogues part before their first "
            f"Assistant turn (first difference at character {at}: "
            f"{preview(chosen_text[at:at + 20])} vs {preview(rejected_text[at:at + 20])})",
            field="rejected")
    prompt = chosen_text[:cut + len(ASSISTANT)]
    if not _TURN_RE.sub("", prompt).strip():
        raise PreferenceDataError("empty prompt (no text before the Assistant turn)",
                                  field="chosen")
    chosen, rejected = chosen_text[len(prompt):], rejected_text[len(prompt):]
    prompt, dropped = truncate_hh_prompt(prompt, max_prompt_turns)
    return prompt, chosen, rejected, dropped


def _continues(response: str) -> bool:
    """Whether an HH response holds later turns (its dialogues parted before the last turn)."""
    return _TURN_RE.search(response) is not None


def iter_hh_rlhf(path: PathLike, *, max_prompt_turns: int | None = DEFAULT_MAX_PROMPT_TURNS,
                 stats: ParseStats | None = None, on_error: OnError = "raise",
                 id_prefix: str | None = None) -> Iterator[PreferencePair]:
    """Yield ``{"id", "prompt", "chosen", "rejected"}`` for each row of an HH-RLHF file.

    Args:
      path: ``.jsonl`` or ``.jsonl.gz`` file in the upstream format.
      max_prompt_turns: keep only the last this many prompt turns (:func:`truncate_hh_prompt`);
        ``None`` keeps everything.
      stats: filled in while iterating (rows, examples, ``prompts_truncated``, errors).
      on_error: ``"raise"`` (default) or ``"collect"`` (see the module docstring).
      id_prefix: overrides :func:`rlhf_jax.data.preference_rows.default_id_prefix`.
    """
    if max_prompt_turns is not None and max_prompt_turns < 1:
        raise ValueError(f"max_prompt_turns must be >= 1 or None, got {max_prompt_turns}")

    def parse(row: Any, st: ParseStats) -> tuple[str, str, str]:
        prompt, chosen, rejected, dropped = parse_hh_row(row, max_prompt_turns=max_prompt_turns)
        if chosen != rejected:   # a pair left out (identical responses) is not counted
            st.prompts_truncated += bool(dropped)
            st.turns_dropped += dropped
            st.empty_responses += not chosen.strip() or not rejected.strip()
            st.multi_turn_responses += _continues(chosen) or _continues(rejected)
        return prompt, chosen, rejected

    return iter_pairs(path, parse, stats=stats, on_error=on_error, id_prefix=id_prefix)


def read_hh_rlhf(path: PathLike, *, max_prompt_turns: int | None = DEFAULT_MAX_PROMPT_TURNS,
                 on_error: OnError = "raise", id_prefix: str | None = None
                 ) -> tuple[list[PreferencePair], ParseStats]:
    """All pairs of an HH-RLHF file, with the file's :class:`ParseStats`."""
    stats = ParseStats(os.fspath(path))
    pairs = list(iter_hh_rlhf(path, max_prompt_turns=max_prompt_turns, stats=stats,
                              on_error=on_error, id_prefix=id_prefix))
    return pairs, stats


# ----------------------------------------------------------------------------------------------
# OpenAI summarize-from-feedback comparisons


def summarize_prompt(subreddit: str, title: str, post: str) -> str:
    """The TL;DR query of the Reddit comparisons, as OpenAI formats it (fields apart by a blank
    line)."""
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def parse_summarize_row(row: Any) -> tuple[str, str, str]:
    """Parse one comparisons row into ``(prompt, chosen, rejected)``; errors name the field."""
    info = require(row, "info", dict, "info")
    if info.get("article") is not None and info.get("post") is None:
        raise PreferenceDataError("a CNN/DM comparison (an article, no Reddit post): only the "
                                  "Reddit TL;DR comparisons are supported; leave the cnndm "
                                  "batches out of the file", field="info.article")
    subreddit = require_text(info, "subreddit", "info.subreddit")
    title = require_text(info, "title", "info.title")
    post = require_text(info, "post", "info.post")
    summaries = require(row, "summaries", list, "summaries")
    if len(summaries) != 2:
        raise PreferenceDataError(f"expected 2 summaries, got {len(summaries)}",
                                  field="summaries")
    texts = [require_text(s, "text", f"summaries[{i}].text") for i, s in enumerate(summaries)]
    choice = require(row, "choice", int, "choice")
    if choice not in (0, 1):
        raise PreferenceDataError(f"must be 0 or 1, got {choice}", field="choice")
    return summarize_prompt(subreddit, title, post), texts[choice], texts[1 - choice]


def iter_summarize_comparisons(path: PathLike, *, stats: ParseStats | None = None,
                               on_error: OnError = "raise", id_prefix: str | None = None
                               ) -> Iterator[PreferencePair]:
    """Yield ``{"id", "prompt", "chosen", "rejected"}`` for each row of a comparisons file.

    Upstream files are JSON lines even when named ``*.json``. Only the Reddit (TL;DR) rows are
    supported: CNN/DM rows carry ``info.article`` instead of ``info.post`` and are refused as
    such (field ``info.article``).
    """
    def parse(row: Any, st: ParseStats) -> tuple[str, str, str]:
        del st
        return parse_summarize_row(row)

    return iter_pairs(path, parse, stats=stats, on_error=on_error, id_prefix=id_prefix)


def read_summarize_comparisons(path: PathLike, *, on_error: OnError = "raise",
                               id_prefix: str | None = None
                               ) -> tuple[list[PreferencePair], ParseStats]:
    """All pairs of a comparisons file, with the file's :class:`ParseStats`."""
    stats = ParseStats(os.fspath(path))
    pairs = list(iter_summarize_comparisons(path, stats=stats, on_error=on_error,
                                            id_prefix=id_prefix))
    return pairs, stats
