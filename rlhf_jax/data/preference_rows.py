"""Reading preference rows from JSON-lines files (plain, or gzip-compressed: detected from the
file's magic bytes, not its name), with errors that name the file, line and field.

Malformed rows are never skipped silently: by default the first one raises
:class:`PreferenceDataError`, whose message names the file, the 1-based line number and the field
(``"data/train.jsonl: line 7: field 'rejected': ..."``). With ``on_error="collect"`` malformed rows
are left out, and each one's error is kept in ``ParseStats.errors``. Blank lines are not rows;
they are counted in ``ParseStats.blank_lines``. A file that cannot be read to the end (e.g. a
truncated gzip), or that has no rows at all (empty, or only blank lines), always raises, naming the
field ``'(file)'``. Text must be valid Unicode (no lone surrogates such as ``"\\ud800"``), and a
JSON object must not repeat a key (JSON would keep only its last value).

A row whose chosen and rejected responses are identical carries no preference: it is left out
(not an error) and counted in ``ParseStats.identical_pairs_skipped``.

The upstream formats themselves are parsed in :mod:`rlhf_jax.data.preference_formats`.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import json
import os
from typing import Any, Callable, Iterator, Literal, Mapping

PathLike = str | os.PathLike[str]
OnError = Literal["raise", "collect"]
PreferencePair = dict[str, str]  # keys: id, prompt, chosen, rejected

_GZIP_MAGIC = b"\x1f\x8b"
_ROW = "(row)"  # the "field" named when the row as a whole is wrong (bad JSON, not an object)
_FILE = "(file)"  # the "field" named when the file as a whole is wrong (unreadable, no rows)


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
    identical_pairs_skipped: int = 0  # rows left out: chosen == rejected (no preference)
    empty_responses: int = 0     # HH only: pairs kept with an empty (or blank) response
    multi_turn_responses: int = 0   # HH only: pairs whose dialogues part before the last turn
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


_UTF8_BOM = b"\xef\xbb\xbf"


def iter_lines(path: PathLike, stats: ParseStats | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(1-based line number, raw bytes)`` for each non-blank line of ``path`` (a UTF-8
    byte order mark before the first is dropped).

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
                                          path=path, line=line_no + 1, field=_FILE) from e
            line_no += 1
            if line_no == 1 and raw.startswith(_UTF8_BOM):   # as some editors save UTF-8
                raw = raw[len(_UTF8_BOM):]
            if not raw.strip():
                if stats is not None:
                    stats.blank_lines += 1
                continue
            if stats is not None:
                stats.rows += 1
            yield line_no, raw


def check_has_rows(path: PathLike) -> None:
    """Raise :class:`PreferenceDataError` (field ``'(file)'``) if ``path`` has no non-blank line."""
    lines = iter_lines(path)
    try:
        if next(lines, None) is None:
            raise PreferenceDataError("no rows (the file is empty or has only blank lines)",
                                      path=path, field=_FILE)
    finally:
        lines.close()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads` refusing a key given twice in one object."""
    out = dict(pairs)
    if len(out) < len(pairs):
        keys = [k for k, _ in pairs]
        key = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise PreferenceDataError(f"duplicate key {key!r} in a JSON object (only the last value "
                                  f"would be kept)", field=_ROW)
    return out


def decode_json_line(raw: bytes) -> Any:
    """Decode one JSON line; invalid UTF-8 or JSON (including a repeated key or nesting too deep
    to decode) -> :class:`PreferenceDataError` ``'(row)'``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PreferenceDataError(f"invalid UTF-8 at byte {e.start}", field=_ROW) from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise PreferenceDataError(f"invalid JSON at column {e.colno}: {e.msg}",
                                  field=_ROW) from None
    except RecursionError:
        raise PreferenceDataError("invalid JSON: nested too deeply to decode",
                                  field=_ROW) from None


RowParser = Callable[[Any, ParseStats], tuple[str, str, str]]


def iter_pairs(path: PathLike, parse_row: RowParser, *, stats: ParseStats | None,
                on_error: OnError, id_prefix: str | None) -> Iterator[PreferencePair]:
    """Shared driver: read lines, parse rows, attach file/line to errors, count; leave out (and
    count) rows whose chosen and rejected responses are identical."""
    if on_error not in ("raise", "collect"):
        raise ValueError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
    stats = stats if stats is not None else ParseStats(os.fspath(path))
    prefix = default_id_prefix(path) if id_prefix is None else id_prefix
    check_has_rows(path)
    for line_no, raw in iter_lines(path, stats):
        try:
            prompt, chosen, rejected = parse_row(decode_json_line(raw), stats)
        except PreferenceDataError as e:
            if on_error == "raise":
                raise e.located(path, line_no) from None
            stats.errors.append(e.located(path, line_no))
            continue
        if chosen == rejected:
            stats.identical_pairs_skipped += 1
            continue
        stats.examples += 1
        yield {"id": f"{prefix}:{line_no}", "prompt": prompt, "chosen": chosen,
               "rejected": rejected}


# ----------------------------------------------------------------------------------------------
# Field access with named errors


def require(obj: Mapping[str, Any], key: str, kind: type, field: str) -> Any:
    """``obj[key]``, checked to be of ``kind``; errors name ``field``."""
    if not isinstance(obj, Mapping):
        raise PreferenceDataError(f"expected a JSON object, got {type(obj).__name__}",
                                  field=field.rpartition(".")[0] or _ROW)
    if key not in obj:
        raise PreferenceDataError("missing field", field=field)
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PreferenceDataError(
            f"expected {kind.__name__}, got {type(value).__name__} ({preview(value)})",
            field=field)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PreferenceDataError(f"not valid Unicode text: lone surrogate "
                                      f"{value[e.start]!r} at character {e.start}",
                                      field=field) from None
    return value


def require_text(obj: Mapping[str, Any], key: str, field: str) -> str:
    value = require(obj, key, str, field)
    if not value.strip():
        raise PreferenceDataError("empty text", field=field)
    return value


def preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
