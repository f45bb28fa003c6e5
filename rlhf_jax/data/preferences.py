"""Preference data sets on disk: versioned TFDS builders (``array_record``, no TensorFlow) of
K-wise preference records (:mod:`rlhf_jax.data.preference_records`), and reading them back.

Storage. Builders subclass ``tfds.core.GeneratorBasedBuilder``, write ``array_record`` files in
generation order (``disable_shuffling=True``, so index ``i`` of a split is its ``i``-th record) and
are versioned (``VERSION`` + ``RELEASE_NOTES``):

* :class:`HhRlhf` and :class:`SummarizeFromFeedback` read local upstream files
  (``split_paths={"train": [...], "test": [...]}``) through
  :mod:`rlhf_jax.data.preference_formats`;
* :class:`SimulatedPreferences` stores records produced by code (lists, or callables returning
  iterables), under a name and version of your choice; :func:`build_preference_dataset` is the
  one-call form.

Each build records, in the dataset's ``metadata.json``, a *build spec* (parser options and the
SHA-256 of every input file, or of the records themselves) and per-split counts (examples, HH
prompt truncations). Preparing again into the same ``data_dir``/name/version with different inputs
raises instead of silently reusing the old files: bump the version, or use another ``data_dir``.

Reading: :func:`load_preference_source` returns ``tfds.data_source(...)``, a random-access
sequence of dicts with ``bytes`` texts and ``float32`` arrays
(:func:`rlhf_jax.data.preference_records.decode_record` turns one into ``str``/``None``-for-
absent-gold form).

Batching them for training: :mod:`rlhf_jax.data.preference_batches`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

from rlhf_jax.data import preference_formats as formats
from rlhf_jax.data.preference_formats import OnError, ParseStats, PathLike, PreferenceDataError
from rlhf_jax.data.preference_records import (canonical_record, pair_to_record,
                                              preference_features, sha256_file, to_example,
                                              validate_record)
from rlhf_jax.data.preference_rows import check_has_rows

FILE_FORMAT = "array_record"
RecordSource = Sequence[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]]
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")



class PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: K-wise preference schema, ``array_record`` files, generation order kept.

    Subclasses implement :meth:`_split_names`, :meth:`_split_records` (yielding records in any
    form :func:`validate_record` accepts) and :meth:`_build_spec`. Builders are not added to the
    global TFDS registry; read prepared data with :func:`load_preference_source`.
    """

    DESCRIPTION = "K-wise preference comparisons."
    HOMEPAGE = ""
    CITATION = ""

    def __init__(self, *, data_dir: PathLike | None = None,
                 file_format: str = FILE_FORMAT, **kwargs: Any):
        super().__init__(data_dir=None if data_dir is None else os.fspath(data_dir),
                         file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:  # pylint: disable=invalid-overridden-method
        """No code directory: there are no downloads, hence no ``checksums.tsv`` to look up.

        TFDS uses this path only to find that file. Its default implementation also imports the
        optional ``importlib_resources`` package for classes defined inside a package, which
        would make preparation fail where that package is not installed.
        """
        return None

    # -- hooks for subclasses

    def _split_names(self) -> list[str]:
        raise NotImplementedError

    def _split_records(self, split: str) -> Iterable[Mapping[str, Any]]:
        raise NotImplementedError

    def _build_spec(self) -> dict[str, Any] | None:
        """JSON-able description of everything that determines the content; None = no inputs."""
        raise NotImplementedError

    def _split_summary(self, split: str, examples: int) -> dict[str, Any]:
        return {"examples": examples}

    # -- TFDS interface

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, features=preference_features(),
            homepage=self.HOMEPAGE or None, citation=self.CITATION or None,
            disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict]]]:
        del dl_manager  # everything is local
        return {split: self._generate_examples(split) for split in self._split_names()}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        first_index: dict[str, int] = {}
        for index, raw in enumerate(self._split_records(split)):
            record = validate_record(raw, where=f"split {split!r}, record {index}")
            if record["id"] in first_index:
                raise PreferenceDataError(
                    f"duplicate id {record['id']!r} (first used by record "
                    f"{first_index[record['id']]})", path=f"split {split!r}, record {index}",
                    field="id")
            first_index[record["id"]] = index
            yield record["id"], to_example(record)
        self.info.metadata.setdefault("splits", {})[split] = self._split_summary(
            split, len(first_index))

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        """Build the data set, or reuse it if already built from the same inputs.

        Raises ``ValueError`` if it was built from different inputs (see the module docstring).
        """
        spec = self._build_spec()
        spec = None if spec is None else json.loads(json.dumps(spec, sort_keys=True))
        if self.is_prepared():
            stored = self.info.metadata.get("build_spec")
            if spec is not None and stored != spec:
                raise ValueError(
                    f"{self.name} {self.version} in {self.data_dir} was built from different "
                    f"inputs:\n  stored:    {json.dumps(stored, sort_keys=True)}\n  requested: "
                    f"{json.dumps(spec, sort_keys=True)}\nBump the version or use another "
                    f"data_dir.")
        elif spec is None:
            raise ValueError(f"{type(self).__name__} has no inputs to build from "
                             f"(and nothing is prepared in {self.data_dir})")
        else:
            self.info.metadata["build_spec"] = spec
        super().download_and_prepare(*args, **kwargs)


def _normalise_split_paths(split_paths: Mapping[str, PathLike | Sequence[PathLike]] | None
                           ) -> dict[str, list[str]] | None:
    if split_paths is None:
        return None
    out = {}
    for split, paths in split_paths.items():
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError(f"split {split!r} has no files")
        out[split] = [os.fspath(p) for p in paths]
    return out


class _PairwiseFileBuilder(PreferenceBuilder, skip_registration=True):
    """Pairwise data read from local upstream files, one or more per split.

    ``on_error="raise"`` (default) stops at the first malformed row; ``"collect"`` leaves
    malformed rows out and records each one's error. Rows with identical chosen and rejected
    responses are left out and counted. After preparation, ``parse_stats[split]`` holds one
    :class:`ParseStats` per file; the same counts and error messages are stored in the data set's
    metadata (``metadata["splits"][split]``). A file without rows, or a split left without pairs,
    raises :class:`PreferenceDataError` naming the files.
    """

    def __init__(self, *, split_paths: Mapping[str, PathLike | Sequence[PathLike]] | None = None,
                 on_error: OnError = "raise", **kwargs: Any):
        if on_error not in ("raise", "collect"):
            raise ValueError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
        self._split_paths = _normalise_split_paths(split_paths)
        self.on_error = on_error
        self.parse_stats: dict[str, list[ParseStats]] = {}
        super().__init__(**kwargs)

    def _parser_options(self) -> dict[str, Any]:
        return {"on_error": self.on_error}

    def _iter_file(self, path: str, stats: ParseStats) -> Iterator[dict[str, str]]:
        raise NotImplementedError

    def _split_names(self) -> list[str]:
        return list(self._split_paths or {})

    def _split_records(self, split: str) -> Iterator[dict[str, Any]]:
        assert self._split_paths is not None
        self.parse_stats[split] = []
        for path in self._split_paths[split]:
            stats = ParseStats(path)
            self.parse_stats[split].append(stats)
            for pair in self._iter_file(path, stats):
                yield pair_to_record(pair)
        if not any(s.examples for s in self.parse_stats[split]):
            left = self._split_summary(split, 0)
            raise PreferenceDataError(
                f"no pairs for split {split!r}: every row was left out "
                f"({left['malformed_rows_left_out']} malformed, "
                f"{left['identical_pairs_skipped']} with identical responses)",
                path=", ".join(self._split_paths[split]), field="(file)")

    def _split_summary(self, split: str, examples: int) -> dict[str, Any]:
        stats = self.parse_stats[split]
        return {"examples": examples,
                "malformed_rows_left_out": sum(len(s.errors) for s in stats),
                "identical_pairs_skipped": sum(s.identical_pairs_skipped for s in stats),
                "prompts_truncated": sum(s.prompts_truncated for s in stats),
                "turns_dropped": sum(s.turns_dropped for s in stats),
                "empty_responses": sum(s.empty_responses for s in stats),
                "multi_turn_responses": sum(s.multi_turn_responses for s in stats),
                "files": [{**s.as_dict(), "path": os.path.basename(s.path)} for s in stats]}

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        for paths in (self._split_paths or {}).values():
            for path in paths:  # before TFDS writes anything (it names no file)
                check_has_rows(path)
        super().download_and_prepare(*args, **kwargs)

    def _build_spec(self) -> dict[str, Any] | None:
        if self._split_paths is None:
            return None
        files = {split: [{"name": os.path.basename(p), "sha256": sha256_file(p)} for p in paths]
                 for split, paths in self._split_paths.items()}
        return {"builder": self.name, "parser": self._parser_options(), "files": files}


class HhRlhf(_PairwiseFileBuilder, skip_registration=True):
    """Anthropic HH-RLHF from local ``*.jsonl(.gz)`` files, as K = 2 records.

    Args:
      split_paths: ``{"train": [path, ...], "test": [...]}`` (e.g. the ``train.jsonl.gz`` of
        several subsets). Ids are ``"{subset dir}/{stem}:{line}"``, so subsets do not collide.
      max_prompt_turns: prompt truncation (see
        :func:`rlhf_jax.data.preference_formats.truncate_hh_prompt`); part of the build spec.
      on_error: ``"raise"`` or ``"collect"`` malformed rows (counted in the metadata).
      data_dir, file_format, ...: passed to ``tfds.core.GeneratorBasedBuilder``.
    """

    name = "hh_rlhf"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Pairwise HH-RLHF as K=2 records (chosen ranked 1, rejected 0); "
                              "prompts keep the last max_prompt_turns turns.",
                     "1.1.0": "The prompt is the dialogues' shared text up to their last shared "
                              "Assistant turn: rows that part at an earlier turn, and empty "
                              "responses, are kept (counted) instead of refused."}
    DESCRIPTION = ("Anthropic HH-RLHF human preference dialogues: shared prompt (up to the last "
                   "shared Assistant turn), chosen and rejected responses.")
    HOMEPAGE = "https://github.com/anthropics/hh-rlhf"
    CITATION = ("@article{bai2022training, title={Training a Helpful and Harmless Assistant with "
                "Reinforcement Learning from Human Feedback}, author={Bai, Yuntao and others}, "
                "journal={arXiv preprint arXiv:2204.05862}, year={2022}}")

    def __init__(self, *, split_paths: Mapping[str, PathLike | Sequence[PathLike]] | None = None,
                 max_prompt_turns: int | None = formats.DEFAULT_MAX_PROMPT_TURNS,
                 **kwargs: Any):
        if max_prompt_turns is not None and max_prompt_turns < 1:
            raise ValueError(f"max_prompt_turns must be >= 1 or None, got {max_prompt_turns}")
        self.max_prompt_turns = max_prompt_turns
        super().__init__(split_paths=split_paths, **kwargs)

    def _parser_options(self) -> dict[str, Any]:
        return {**super()._parser_options(), "max_prompt_turns": self.max_prompt_turns}

    def _iter_file(self, path: str, stats: ParseStats) -> Iterator[dict[str, str]]:
        return formats.iter_hh_rlhf(path, max_prompt_turns=self.max_prompt_turns, stats=stats,
                                    on_error=self.on_error)


class SummarizeFromFeedback(_PairwiseFileBuilder, skip_registration=True):
    """OpenAI summarize-from-feedback comparisons (Reddit TL;DR) from local JSON-lines files.

    Args:
      split_paths: ``{"train": [".../comparisons/batch3.json", ...], ...}``.
      on_error: ``"raise"`` or ``"collect"`` malformed rows (counted in the metadata).
      data_dir, file_format, ...: passed to ``tfds.core.GeneratorBasedBuilder``.
    """

    name = "summarize_from_feedback"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "TL;DR comparisons as K=2 records (chosen = summaries[choice]).",
                     "1.1.0": "Prompts in OpenAI's TL;DR query format (fields apart by a blank "
                              "line, as the summaries were sampled), not single newlines."}
    DESCRIPTION = ("Human comparisons of two TL;DR summaries of a Reddit post; prompt "
                   "'SUBREDDIT: r/..\\n\\nTITLE: ..\\n\\nPOST: ..\\n\\nTL;DR:'.")
    HOMEPAGE = "https://github.com/openai/summarize-from-feedback"
    CITATION = ("@inproceedings{stiennon2020learning, title={Learning to summarize from human "
                "feedback}, author={Stiennon, Nisan and others}, booktitle={NeurIPS}, "
                "year={2020}}")

    def _iter_file(self, path: str, stats: ParseStats) -> Iterator[dict[str, str]]:
        return formats.iter_summarize_comparisons(path, stats=stats, on_error=self.on_error)


class SimulatedPreferences(PreferenceBuilder, skip_registration=True):
    """K-wise records produced by code, stored once under a name and version.

    Args:
      records_by_split: ``{split: records}``; ``records`` is a sequence of record dicts
        (:func:`validate_record`) or a zero-argument callable returning an iterable of them. The
        records are materialised once when preparing, and their SHA-256 is the build spec.
      name: data set name (``snake_case``); the files go to ``{data_dir}/{name}/{version}``.
      version: ``"MAJOR.MINOR.PATCH"``; bump it whenever the generating code changes.
      release_notes: ``{version: note}``; defaults to a generic note for ``version``.
      description: free text stored in ``dataset_info.json``.
      data_dir, file_format, ...: passed to ``tfds.core.GeneratorBasedBuilder``.
    """

    name = "simulated_preferences"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "K-wise preference records generated by code."}

    def __init__(self, *, records_by_split: Mapping[str, RecordSource] | None = None,
                 name: str = "simulated_preferences", version: str = "1.0.0",
                 release_notes: Mapping[str, str] | None = None,
                 description: str | None = None, **kwargs: Any):
        if not _NAME_RE.match(name):
            raise ValueError(f"name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
        # Per-instance name/version, as tfds.dataset_builders.AdhocBuilder does.
        self.name = name
        self.VERSION = tfds.core.Version(str(version))  # pylint: disable=invalid-name
        self.RELEASE_NOTES = dict(release_notes or {  # pylint: disable=invalid-name
            str(version): "K-wise preference records generated by code."})
        if description:
            self.DESCRIPTION = description  # pylint: disable=invalid-name
        self._sources = None if records_by_split is None else dict(records_by_split)
        self._records: dict[str, list[dict[str, Any]]] | None = None
        super().__init__(version=str(version), **kwargs)

    def _materialise(self) -> dict[str, list[dict[str, Any]]]:
        if self._records is None:
            assert self._sources is not None
            self._records = {
                split: [validate_record(r, where=f"split {split!r}, record {i}")
                        for i, r in enumerate(src() if callable(src) else src)]
                for split, src in self._sources.items()}
        return self._records

    def _split_names(self) -> list[str]:
        return list(self._sources or {})

    def _split_records(self, split: str) -> list[dict[str, Any]]:
        return self._materialise()[split]

    def _build_spec(self) -> dict[str, Any] | None:
        if self._sources is None:
            return None
        digests = {}
        for split, records in self._materialise().items():
            h = hashlib.sha256()
            for r in records:
                h.update(json.dumps(canonical_record(r), sort_keys=True).encode("utf-8") + b"\n")
            digests[split] = h.hexdigest()
        return {"builder": "simulated_preferences", "records_sha256": digests}


def build_preference_dataset(records_by_split: Mapping[str, RecordSource], data_dir: PathLike,
                             name: str = "simulated_preferences", version: str = "1.0.0", *,
                             release_notes: Mapping[str, str] | None = None,
                             description: str | None = None) -> SimulatedPreferences:
    """Store K-wise records as a versioned TFDS data set; returns the prepared builder.

    Re-running with identical records reuses the files; with different records under the same
    name and version it raises ``ValueError``.
    """
    builder = SimulatedPreferences(records_by_split=records_by_split, name=name, version=version,
                                   release_notes=release_notes, description=description,
                                   data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def split_files(data_dir: PathLike, splits: Sequence[str] = ("train", "test")
                ) -> dict[str, str]:
    """``{split: path}`` of a directory of upstream files named ``{split}.jsonl`` or
    ``{split}.jsonl.gz`` (exactly one per split; ``FileNotFoundError`` naming what is missing)."""
    out = {}
    for split in splits:
        found = [os.path.join(os.fspath(data_dir), f"{split}{ext}")
                 for ext in (".jsonl", ".jsonl.gz")]
        found = [f for f in found if os.path.isfile(f)]
        if len(found) != 1:
            raise FileNotFoundError(
                f"{data_dir}: expected one of {split}.jsonl, {split}.jsonl.gz, found "
                f"{[os.path.basename(f) for f in found] or 'neither'}")
        out[split] = found[0]
    return out


def load_preference_source(data_dir: PathLike, name: str, split: str, *,
                           version: str | None = None) -> Sequence[dict[str, Any]]:
    """``tfds.data_source`` over a prepared preference data set (latest version by default).

    Elements are dicts with ``bytes`` texts, a list of ``bytes`` responses, ``float32``
    ``ranking``/``gold`` arrays (``gold`` empty when absent) and ``response_ids``, a list of
    ``int32`` arrays (empty when absent; no such key in a data set stored before the field
    existed); see :func:`decode_record`. Never builds anything: a missing data set raises
    ``FileNotFoundError``.
    """
    spec = name if version is None else f"{name}:{version}"
    try:
        return tfds.data_source(spec, split=split, data_dir=os.fspath(data_dir), download=False)
    except tfds.core.DatasetNotFoundError:
        root = os.fspath(data_dir)
        found = sorted(os.listdir(root)) if os.path.isdir(root) else []
        raise FileNotFoundError(f"no prepared data set {spec!r} in {root} (found: "
                                f"{[f for f in found if f != 'downloads']})") from None
