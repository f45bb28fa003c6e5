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
  "rejected": ...}``. The prompt is everything up to and including the last ``"\\n\\nAssistant:"``;
  ``chosen``/``rejected`` must share it. Long prompts are truncated (see
  :func:`truncate_hh_prompt`) and every truncation is counted in :class:`ParseStats`.
* **OpenAI summarize-from-feedback comparisons** (:func:`iter_summarize_comparisons`):
  ``{"info": {"post", "title", "subreddit", ...}, "summaries": [{"text"}, {"text"}],
  "choice": 0 | 1}``; the prompt is
  ``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"``.

Malformed rows are never skipped silently: by default the first one raises
:class:`PreferenceDataError`, whose message names the file, the 1-based line number and the field
(``"data/train.jsonl: line 7: field 'rejected': ..."``). With ``on_error="collect"`` malformed rows
are left out, and each one's error is kept in ``ParseStats.errors``. Blank lines are not rows;
they are counted in ``ParseStats.blank_lines``. A file that cannot be read to the end (e.g. a
truncated gzip) always raises, naming the first unreadable line and the field ``'(file)'``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import json
import os
import re
from typing import Any, Callable, Iterator, Literal, Mapping

PathLike = str | os.PathLike[str]
OnError = Literal["raise", "collect"]
PreferencePair = dict[str, str]  # keys: id, prompt, chosen, rejected

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
DEFAULT_MAX_PROMPT_TURNS = 8

_TURN_RE = re.compile(r"\n\n(Human|Assistant):")
_GZIP_MAGIC = b"\x1f\x8b"
_ROW = "(row)"  # the "field" named when the row as a whole is wrong (bad JSON, not an object)


class PreferenceDataError(ValueError):
    """A malformed preference row (or record). The message names file, line and field if known."""

    def __init__(self, detail: str, *, path: PathLike | None = None, line: int | None = None,
                 field: str | None = None):
        self.detail = detail
        self.path = None if path is None else os.fspath(path)
        self.line = line
        self.field = field
        where = []
        if self.path is not None:
            where.append(self.path)
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join(where + [detail]))

    def located(self, path: PathLike, line: int) -> "PreferenceDataError":
        """The same error, with the file and 1-based line number attached."""
        return PreferenceDataError(self.detail, path=path, line=line, field=self.field)

    def __reduce__(self) -> tuple[Any, tuple[str]]:  # keep path/line/field through pickling
        return (functools.partial(PreferenceDataError, path=self.path, line=self.line,
                                  field=self.field), (self.detail,))


@dataclasses.dataclass
class ParseStats:
    """What a parser saw in one file. Filled in while iterating; final once iteration ends."""

    path: str
    rows: int = 0                # non-blank lines read
    examples: int = 0            # pairs yielded
    blank_lines: int = 0
    prompts_truncated: int = 0   # HH only: pairs whose prompt lost turns
    turns_dropped: int = 0       # HH only: total prompt turns removed by truncation
    errors: list[PreferenceDataError] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (errors as their messages)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["errors"] = [str(e) for e in self.errors]
        return out


# ----------------------------------------------------------------------------------------------
# Reading JSON lines


def default_id_prefix(path: PathLike) -> str:
    """``"{parent dir}/{stem}"`` with ``.gz``, ``.jsonl`` and ``.json`` stripped from the name."""
    name = os.path.basename(os.fspath(path))
    for suffix in (".gz", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    parent = os.path.basename(os.path.dirname(os.path.abspath(os.fspath(path))))
    return f"{parent}/{name}" if parent else name


def _open_binary(path: PathLike) -> io.BufferedIOBase:
    """Open ``path`` for reading bytes, transparently gunzipping it if it is gzip-compressed."""
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")  # type: ignore[return-value]


def iter_lines(path: PathLike, stats: ParseStats | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(1-based line number, raw bytes)`` for each non-blank line of ``path``.

    A file that cannot be read to the end (e.g. truncated gzip) raises
    :class:`PreferenceDataError` naming the first line that could not be read.
    """
    line_no = 0
    with _open_binary(path) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
                raise PreferenceDataError(f"unreadable file ({type(e).__name__}: {e})",
                                          path=path, line=line_no + 1, field="(file)") from e
            line_no += 1
            if not raw.strip():
                if stats is not None:
                    stats.blank_lines += 1
                continue
            if stats is not None:
                stats.rows += 1
            yield line_no, raw


def decode_json_line(raw: bytes) -> Any:
    """Decode one JSON line; invalid UTF-8 or JSON -> :class:`PreferenceDataError` ``'(row)'``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PreferenceDataError(f"invalid UTF-8 at byte {e.start}", field=_ROW) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PreferenceDataError(f"invalid JSON at column {e.colno}: {e.msg}",
                                  field=_ROW) from None


RowParser = Callable[[Any, ParseStats], tuple[str, str, str]]


def _iter_pairs(path: PathLike, parse_row: RowParser, *, stats: ParseStats | None,
                on_error: OnError, id_prefix: str | None) -> Iterator[PreferencePair]:
    """Shared driver: read lines, parse rows, attach file/line to errors, count."""
    if on_error not in ("raise", "collect"):
        raise ValueError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
    stats = stats if stats is not None else ParseStats(os.fspath(path))
    prefix = default_id_prefix(path) if id_prefix is None else id_prefix
    for line_no, raw in iter_lines(path, stats):
        try:
            prompt, chosen, rejected = parse_row(decode_json_line(raw), stats)
        except PreferenceDataError as e:
            if on_error == "raise":
                raise e.located(path, line_no) from None
            stats.errors.append(e.located(path, line_no))
            continue
        stats.examples += 1
        yield {"id": f"{prefix}:{line_no}", "prompt": prompt, "chosen": chosen,
               "rejected": rejected}


# ----------------------------------------------------------------------------------------------
# Field access with named errors


def _require(obj: Mapping[str, Any], key: str, kind: type, field: str) -> Any:
    """``obj[key]``, checked to be of ``kind``; errors name ``field``."""
    if not isinstance(obj, Mapping):
        raise PreferenceDataError(f"expected a JSON object, got {type(obj).__name__}",
                                  field=field.rpartition(".")[0] or _ROW)
    if key not in obj:
        raise PreferenceDataError("missing field", field=field)
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PreferenceDataError(
            f"expected {kind.__name__}, got {type(value).__name__} ({_preview(value)})",
            field=field)
    return value


def _require_text(obj: Mapping[str, Any], key: str, field: str) -> str:
    value = _require(obj, key, str, field)
    if not value.strip():
        raise PreferenceDataError("empty text", field=field)
    return value


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Anthropic HH-RLHF


def split_hh_dialogue(text: str, field: str = "dialogue") -> tuple[str, str]:
    """Split an HH dialogue into ``(prompt, final assistant response)``.

    The prompt is everything up to and including the last ``"\\n\\nAssistant:"``; the response is
    the rest, verbatim (leading space included), so ``prompt + response == text``.

    Raises :class:`PreferenceDataError` naming ``field`` if there is no Assistant turn, the
    dialogue does not start with ``"\\n\\nHuman:"``, it ends with a Human turn, or the prompt or the
    final response is empty.
    """
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise PreferenceDataError(f"no Assistant turn (no {ASSISTANT!r} in the dialogue)",
                                  field=field)
    prompt, response = text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT):]
    if not text.startswith(HUMAN):
        raise PreferenceDataError(f"dialogue must start with {HUMAN!r}, starts with "
                                  f"{_preview(text[:20])}", field=field)
    if HUMAN in response:
        raise PreferenceDataError("dialogue ends with a Human turn, not an Assistant response",
                                  field=field)
    if not response.strip():
        raise PreferenceDataError("empty final Assistant response", field=field)
    if not _TURN_RE.sub("", prompt).strip():
        raise PreferenceDataError("empty prompt (no text before the final Assistant turn)",
                                  field=field)
    return prompt, response


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
      ``max_turns`` remain, and then a leading Assistant turn is dropped too, so the truncated
      prompt still starts with ``"\\n\\nHuman:"`` (it may keep ``max_turns - 1`` turns);
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
    first = len(turns) - max_turns
    while first < len(turns) - 1 and turns[first][1] != "Human":
        first += 1
    return prompt[turns[first][0]:], first


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def parse_hh_row(row: Any, *, max_prompt_turns: int | None = DEFAULT_MAX_PROMPT_TURNS
                 ) -> tuple[str, str, str, int]:
    """Parse one HH-RLHF row into ``(prompt, chosen, rejected, prompt turns dropped)``.

    Errors are :class:`PreferenceDataError` naming the field (no file/line: see
    :func:`iter_hh_rlhf`).
    """
    chosen_text = _require(row, "chosen", str, "chosen")
    rejected_text = _require(row, "rejected", str, "rejected")
    prompt, chosen = split_hh_dialogue(chosen_text, "chosen")
    rejected_prompt, rejected = split_hh_dialogue(rejected_text, "rejected")
    if rejected_prompt != prompt:
        at = _first_difference(prompt, rejected_prompt)
        raise PreferenceDataError(
            f"does not share the prompt of 'chosen' (first difference at character {at}: "
            f"{_preview(prompt[at:at + 20])} vs {_preview(rejected_prompt[at:at + 20])})",
            field="rejected")
    prompt, dropped = truncate_hh_prompt(prompt, max_prompt_turns)
    return prompt, chosen, rejected, dropped


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
      id_prefix: overrides :func:`default_id_prefix`.
    """
    if max_prompt_turns is not None and max_prompt_turns < 1:
        raise ValueError(f"max_prompt_turns must be >= 1 or None, got {max_prompt_turns}")

    def parse(row: Any, st: ParseStats) -> tuple[str, str, str]:
        prompt, chosen, rejected, dropped = parse_hh_row(row, max_prompt_turns=max_prompt_turns)
        if dropped:
            st.prompts_truncated += 1
            st.turns_dropped += dropped
        return prompt, chosen, rejected

    return _iter_pairs(path, parse, stats=stats, on_error=on_error, id_prefix=id_prefix)


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
    """The TL;DR prompt used for the Reddit comparisons."""
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def parse_summarize_row(row: Any) -> tuple[str, str, str]:
    """Parse one comparisons row into ``(prompt, chosen, rejected)``; errors name the field."""
    info = _require(row, "info", dict, "info")
    subreddit = _require_text(info, "subreddit", "info.subreddit")
    title = _require_text(info, "title", "info.title")
    post = _require_text(info, "post", "info.post")
    summaries = _require(row, "summaries", list, "summaries")
    if len(summaries) != 2:
        raise PreferenceDataError(f"expected 2 summaries, got {len(summaries)}",
                                  field="summaries")
    texts = [_require_text(s, "text", f"summaries[{i}].text") for i, s in enumerate(summaries)]
    choice = _require(row, "choice", int, "choice")
    if choice not in (0, 1):
        raise PreferenceDataError(f"must be 0 or 1, got {choice}", field="choice")
    return summarize_prompt(subreddit, title, post), texts[choice], texts[1 - choice]


def iter_summarize_comparisons(path: PathLike, *, stats: ParseStats | None = None,
                               on_error: OnError = "raise", id_prefix: str | None = None
                               ) -> Iterator[PreferencePair]:
    """Yield ``{"id", "prompt", "chosen", "rejected"}`` for each row of a comparisons file.

    Upstream files are JSON lines even when named ``*.json``. Only the Reddit (TL;DR) rows are
    supported: CNN/DM rows carry ``info.article`` instead of ``info.post`` and are reported as
    malformed (missing ``info.subreddit``).
    """
    def parse(row: Any, st: ParseStats) -> tuple[str, str, str]:
        del st
        return parse_summarize_row(row)

    return _iter_pairs(path, parse, stats=stats, on_error=on_error, id_prefix=id_prefix)


def read_summarize_comparisons(path: PathLike, *, on_error: OnError = "raise",
                               id_prefix: str | None = None
                               ) -> tuple[list[PreferencePair], ParseStats]:
    """All pairs of a comparisons file, with the file's :class:`ParseStats`."""
    stats = ParseStats(os.fspath(path))
    pairs = list(iter_summarize_comparisons(path, stats=stats, on_error=on_error,
                                            id_prefix=id_prefix))
    return pairs, stats
