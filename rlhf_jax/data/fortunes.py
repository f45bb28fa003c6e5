"""Debian's ``fortunes`` texts as a TFDS data set read from a local directory (manual data).

The ``fortunes`` package (``apt-get install fortunes``; ``dpkg -L fortunes`` shows the directory,
``/usr/share/games/fortunes``) holds ~40 files of short English texts separated by lines holding
only ``%``. :class:`Fortunes` reads such a directory as TFDS *manual data* and stores one record
per text (``array_record``, no TensorFlow):

* attribution lines (``\t\t-- Mark Twain`` and everything after them) are stripped, whitespace is
  collapsed to single spaces;
* non-prose files (:data:`NON_PROSE`: ``ascii-art``, ``translate-me``) and, in any file, texts
  that are mostly not letters (ASCII pictures: letter share below :data:`MIN_LETTER_SHARE`) are
  dropped;
* exact duplicates (after cleaning) are kept once;
* the split is a function of the text alone: ``heldout`` when the first 8 bytes of its SHA-256,
  as an integer, are ``0 (mod heldout_every)``, else ``train`` — a text and its duplicates can
  never be on both sides.

``.dat`` index files, ``.u8`` symlinks and hidden files are not text files and are skipped. The
build records the SHA-256 of every input file; preparing again into the same ``data_dir`` from
other files raises instead of silently reusing the old records.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import tensorflow_datasets as tfds

from rlhf_jax.configs import ConfigError

DEFAULT_DIR = "/usr/share/games/fortunes"
APT_HINT = "apt-get install fortunes"
NON_PROSE = frozenset({"ascii-art", "translate-me"})
MIN_LETTER_SHARE = 0.6
SPLITS = ("train", "heldout")
_ATTRIBUTION = re.compile(r"^\s+--\s*\S")      # an indented "-- Author" line
_LAST_ATTRIBUTION = re.compile(r"^--\s*\S")    # "-- Author" flush left, as the last line only


def strip_attribution(text: str) -> str:
    """``text`` without its attribution: the first indented ``-- Author`` line (or a flush-left
    one that is the last line) and every line after it. A dash line inside the text that is
    followed by more prose at the margin is kept ("...he is unbiased\\n-- he hates all...")."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i and (_ATTRIBUTION.match(line) or (i == len(lines) - 1
                                               and _LAST_ATTRIBUTION.match(line))):
            return "\n".join(lines[:i])
    return text


def clean(text: str) -> str:
    """Attribution stripped, whitespace collapsed to single spaces."""
    return " ".join(strip_attribution(text).split())


def is_prose(text: str) -> bool:
    """At least :data:`MIN_LETTER_SHARE` of the non-space characters are letters."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(c.isalpha() for c in chars) / len(chars) >= MIN_LETTER_SHARE


def split_of(text: str, heldout_every: int) -> str:
    """``heldout`` or ``train``, from the text's SHA-256 alone."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % heldout_every == 0 else "train"


class FortunesNotFound(FileNotFoundError, ConfigError):
    """No fortune files where the task's ``fortunes_dir`` option points: bad input (a
    :class:`ConfigError`, which the scripts report as ``error: …``, exit 2), and a
    ``FileNotFoundError``."""


def fortune_files(directory: str | os.PathLike) -> list[Path]:
    """The text files of a fortunes directory (sorted; no ``.dat``/``.u8``/hidden files, no
    :data:`NON_PROSE` files). A missing directory raises ``FileNotFoundError`` naming it and the
    apt command that installs it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FortunesNotFound(
            f"fortunes directory {directory} does not exist: install Debian's texts with "
            f"`{APT_HINT}` (`dpkg -L fortunes` shows where they are), or point the task's "
            f"fortunes_dir option at a directory of fortune files")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
                   and p.suffix not in (".dat", ".u8") and p.name not in NON_PROSE)
    if not files:
        raise FortunesNotFound(f"fortunes directory {directory} holds no fortune files "
                                f"(reinstall with `{APT_HINT}`)")
    return files


def read_texts(directory: str | os.PathLike) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """``([(file name, cleaned text)], counts)``: every prose text of the directory once, in file
    order (the first occurrence of a duplicate wins); ``counts`` says how many were read, dropped
    as non-prose or empty, and dropped as duplicates."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    counts = {"read": 0, "non_prose": 0, "duplicates": 0}
    for path in fortune_files(directory):
        raw = path.read_text(encoding="utf-8", errors="replace")
        for chunk in re.split(r"^%[ \t]*$", raw, flags=re.MULTILINE):
            if not chunk.strip():
                continue
            counts["read"] += 1
            text = clean(chunk)
            if not is_prose(text):
                counts["non_prose"] += 1
            elif text in seen:
                counts["duplicates"] += 1
            else:
                seen.add(text)
                out.append((path.name, text))
    return out, counts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Fortunes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The fortunes texts, ``train`` / ``heldout`` by hash (module docstring), from the manual
    directory ``manual_dir``. Records: ``{"text", "source"}`` (source = file name), in file
    order."""

    name = "fortunes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Attribution stripped, non-prose dropped, de-duplicated, split by "
                              "SHA-256 of the text."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Install Debian's fortunes (`{APT_HINT}`) and pass its "
                                    f"directory ({DEFAULT_DIR}) as manual_dir.")

    def __init__(self, *, manual_dir: str | os.PathLike = DEFAULT_DIR, heldout_every: int = 10,
                 data_dir: str | os.PathLike | None = None, **kwargs: Any):
        if heldout_every < 2:
            raise ValueError(f"heldout_every must be >= 2, got {heldout_every}")
        self.manual_dir = Path(manual_dir)
        self.heldout_every = heldout_every
        super().__init__(data_dir=None if data_dir is None else os.fspath(data_dir),
                         file_format="array_record", **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:  # pylint: disable=invalid-overridden-method
        return None   # no downloads, hence no checksums file to look up

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Debian fortunes: short English texts, one per record.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                 "source": tfds.features.Text()}),
            disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def build_spec(self) -> dict[str, Any]:
        """Everything the records depend on: the input files' SHA-256 and the split rule."""
        return {"files": {p.name: _sha256(p) for p in fortune_files(self.manual_dir)},
                "heldout_every": self.heldout_every, "non_prose": sorted(NON_PROSE),
                "min_letter_share": MIN_LETTER_SHARE}

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager   # the manual directory is read directly (errors name it)
        texts, counts = read_texts(self.manual_dir)
        self.info.metadata["counts"] = counts
        by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
        for source, text in texts:
            by_split[split_of(text, self.heldout_every)].append((source, text))
        return {s: self._generate_examples(rows) for s, rows in by_split.items()}

    def _generate_examples(self, rows: list[tuple[str, str]]) -> Iterator[tuple[str, dict[str, str]]]:
        for source, text in rows:
            yield hashlib.sha256(text.encode("utf-8")).hexdigest(), {"text": text,
                                                                      "source": source}

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        """Build, or reuse a build from the same input files (else ``ValueError``)."""
        spec = json.loads(json.dumps(self.build_spec(), sort_keys=True))
        if self.is_prepared():
            stored = self.info.metadata.get("build_spec")
            if stored != spec:
                raise ValueError(f"{self.name} {self.version} in {self.data_dir} was built from "
                                 f"other fortune files than {self.manual_dir}; use another "
                                 f"data_dir")
            return
        self.info.metadata["build_spec"] = spec
        super().download_and_prepare(*args, **kwargs)


def load_fortunes(manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
                  heldout_every: int = 10) -> dict[str, list[str]]:
    """``{"train": [...], "heldout": [...]}``: the texts of the fortunes directory ``manual_dir``,
    built (once) into the TFDS data set under ``data_dir`` and read back from it."""
    builder = Fortunes(manual_dir=manual_dir, heldout_every=heldout_every, data_dir=data_dir)
    builder.download_and_prepare()
    return {s: [r["text"].decode("utf-8") if isinstance(r["text"], bytes) else r["text"]
                for r in builder.as_data_source(split=s)] for s in SPLITS}
