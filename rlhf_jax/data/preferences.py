"""Preference data on disk (TFDS ``array_record``, no TensorFlow) and resumable batching (grain).

Record schema (one K-wise comparison; pairwise data is the K = 2 case)::

    id         text          unique within a split, stable (e.g. "helpful-base/train:17")
    prompt     text
    responses  K texts       K >= 2
    ranking    K float32     higher = preferred; equal scores = tie
    gold       K float32     optional (stored as an empty vector when absent); evaluation only

A pair ``{"prompt", "chosen", "rejected"}`` becomes ``responses=[chosen, rejected]``,
``ranking=[1.0, 0.0]`` (:func:`pair_to_record`).

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
sequence of dicts with ``bytes`` texts and ``float32`` arrays (:func:`decode_record` turns one
into ``str``/``None``-for-absent-gold form).

Batching: :func:`preference_loader` builds a grain pipeline (global shuffle per epoch from a seed,
optional disjoint sharding for multi-host, a per-record ``map_fn`` hook for tokenisation, epoch-
aligned batches) and returns a checkpointable iterator. Resuming::

    it = preference_loader(source, batch_size=8, seed=0)
    for _ in range(100):
        next(it)
    state = it.get_state()            # small JSON-able dict; store it with the model checkpoint
    ...
    it = preference_loader(source, batch_size=8, seed=0)   # same arguments
    it.set_state(state)               # next(it) is batch 100, exactly as without the restart
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import preference_formats as formats
from rlhf_jax.data.preference_formats import OnError, ParseStats, PathLike, PreferenceDataError

FILE_FORMAT = "array_record"
TEXT_FIELDS = ("id", "prompt")
RecordSource = Sequence[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]]
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


# ----------------------------------------------------------------------------------------------
# Schema and records


def preference_features() -> tfds.features.FeaturesDict:
    """The TFDS feature spec of a K-wise preference record."""
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "prompt": tfds.features.Text(),
        "responses": tfds.features.Sequence(tfds.features.Text()),
        "ranking": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "gold": tfds.features.Tensor(shape=(None,), dtype=np.float32),
    })


def _scores(value: Any, k: int, field: str, where: str) -> np.ndarray:
    """``value`` as a finite float32 vector of length ``k``."""
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise PreferenceDataError(f"expected {k} numbers, got {value!r}", path=where,
                                  field=field) from None
    if arr.shape != (k,):
        raise PreferenceDataError(f"expected {k} scores (one per response), got shape "
                                  f"{arr.shape}", path=where, field=field)
    if not np.all(np.isfinite(arr)):
        raise PreferenceDataError(f"scores must be finite, got {arr.tolist()}", path=where,
                                  field=field)
    return arr


def validate_record(record: Mapping[str, Any], *, where: str = "record") -> dict[str, Any]:
    """Check a K-wise record and return it normalised.

    Returns ``{"id": str, "prompt": str, "responses": list[str], "ranking": float32[K],
    "gold": float32[K] | None}``. Errors are :class:`PreferenceDataError` naming ``where`` and the
    field.
    """
    if not isinstance(record, Mapping):
        raise PreferenceDataError(f"expected a dict, got {type(record).__name__}", path=where)
    unknown = set(record) - {"id", "prompt", "responses", "ranking", "gold"}
    if unknown:
        raise PreferenceDataError(f"unknown fields {sorted(unknown)}", path=where,
                                  field=sorted(unknown)[0])
    for field in ("id", "prompt", "responses", "ranking"):
        if field not in record:
            raise PreferenceDataError("missing field", path=where, field=field)
    for field in TEXT_FIELDS:
        if not isinstance(record[field], str):
            raise PreferenceDataError(f"expected str, got {type(record[field]).__name__}",
                                      path=where, field=field)
    if not record["id"]:
        raise PreferenceDataError("empty id", path=where, field="id")
    responses = record["responses"]
    if isinstance(responses, str) or not isinstance(responses, Sequence):
        raise PreferenceDataError(f"expected a list of str, got {type(responses).__name__}",
                                  path=where, field="responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise PreferenceDataError(f"expected str, got {type(r).__name__}", path=where,
                                      field=f"responses[{i}]")
    k = len(responses)
    if k < 2:
        raise PreferenceDataError(f"need at least 2 responses, got {k}", path=where,
                                  field="responses")
    gold = record.get("gold")
    return {
        "id": record["id"],
        "prompt": record["prompt"],
        "responses": list(responses),
        "ranking": _scores(record["ranking"], k, "ranking", where),
        "gold": None if gold is None else _scores(gold, k, "gold", where),
    }


def make_record(*, id: str, prompt: str, responses: Sequence[str],  # noqa: A002 (schema name)
                ranking: Sequence[float], gold: Sequence[float] | None = None
                ) -> dict[str, Any]:
    """A validated K-wise record (see :func:`validate_record`)."""
    return validate_record({"id": id, "prompt": prompt, "responses": responses,
                            "ranking": ranking, "gold": gold})


def pair_to_record(pair: Mapping[str, str]) -> dict[str, Any]:
    """``{"id", "prompt", "chosen", "rejected"}`` -> K = 2 record with ranking ``[1, 0]``."""
    return make_record(id=pair["id"], prompt=pair["prompt"],
                       responses=[pair["chosen"], pair["rejected"]], ranking=[1.0, 0.0])


def _to_example(record: Mapping[str, Any]) -> dict[str, Any]:
    """A validated record in the form TFDS encodes (absent gold -> empty vector)."""
    gold = record["gold"]
    return {**record, "gold": np.zeros((0,), np.float32) if gold is None else gold}


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def decode_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A record read back from TFDS (bytes, empty gold) in :func:`validate_record` form."""
    gold = np.asarray(raw["gold"], np.float32)
    return {
        "id": _text(raw["id"]),
        "prompt": _text(raw["prompt"]),
        "responses": [_text(r) for r in raw["responses"]],
        "ranking": np.asarray(raw["ranking"], np.float32),
        "gold": None if gold.size == 0 else gold,
    }


def ranked_pairs(ranking: Sequence[float]) -> list[tuple[int, int]]:
    """All ``(i, j)`` with response ``i`` strictly preferred to ``j``; ties give no pair.

    For reward-model training on K-wise data (every ordered, non-tied pair of a ranking).
    """
    r = np.asarray(ranking)
    return [(i, j) for i in range(len(r)) for j in range(len(r)) if r[i] > r[j]]


def _canonical(record: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able form of a validated record, for content hashing."""
    gold = record["gold"]
    return {"id": record["id"], "prompt": record["prompt"], "responses": record["responses"],
            "ranking": [float(x) for x in record["ranking"]],
            "gold": None if gold is None else [float(x) for x in gold]}


def _sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# TFDS builders


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
            yield record["id"], _to_example(record)
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
    malformed rows out and records each one's error. After preparation, ``parse_stats[split]``
    holds one :class:`ParseStats` per file; the same counts and error messages are stored in the
    data set's metadata (``metadata["splits"][split]``).
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

    def _split_summary(self, split: str, examples: int) -> dict[str, Any]:
        stats = self.parse_stats[split]
        return {"examples": examples,
                "malformed_rows_left_out": sum(len(s.errors) for s in stats),
                "prompts_truncated": sum(s.prompts_truncated for s in stats),
                "turns_dropped": sum(s.turns_dropped for s in stats),
                "files": [{**s.as_dict(), "path": os.path.basename(s.path)} for s in stats]}

    def _build_spec(self) -> dict[str, Any] | None:
        if self._split_paths is None:
            return None
        files = {split: [{"name": os.path.basename(p), "sha256": _sha256_file(p)} for p in paths]
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
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Pairwise HH-RLHF as K=2 records (chosen ranked 1, rejected 0); "
                              "prompts keep the last max_prompt_turns turns."}
    DESCRIPTION = ("Anthropic HH-RLHF human preference dialogues: shared prompt (up to the last "
                   "Assistant turn), chosen and rejected final Assistant responses.")
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
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "TL;DR comparisons as K=2 records (chosen = summaries[choice])."}
    DESCRIPTION = ("Human comparisons of two TL;DR summaries of a Reddit post; prompt "
                   "'SUBREDDIT: r/..\\nTITLE: ..\\nPOST: ..\\nTL;DR:'.")
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
                h.update(json.dumps(_canonical(r), sort_keys=True).encode("utf-8") + b"\n")
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


def load_preference_source(data_dir: PathLike, name: str, split: str, *,
                           version: str | None = None) -> Sequence[dict[str, Any]]:
    """``tfds.data_source`` over a prepared preference data set (latest version by default).

    Elements are dicts with ``bytes`` texts, a list of ``bytes`` responses and ``float32``
    ``ranking``/``gold`` arrays (``gold`` empty when absent); see :func:`decode_record`. Never
    builds anything: a missing data set raises ``FileNotFoundError``.
    """
    spec = name if version is None else f"{name}:{version}"
    try:
        return tfds.data_source(spec, split=split, data_dir=os.fspath(data_dir), download=False)
    except tfds.core.DatasetNotFoundError:
        root = os.fspath(data_dir)
        found = sorted(os.listdir(root)) if os.path.isdir(root) else []
        raise FileNotFoundError(f"no prepared data set {spec!r} in {root} (found: "
                                f"{[f for f in found if f != 'downloads']})") from None


# ----------------------------------------------------------------------------------------------
# Batching with grain


def _as_array(value: Any) -> np.ndarray:
    """Texts (and lists of texts) as object arrays (no fixed-width padding); rest as arrays."""
    if isinstance(value, (str, bytes)):
        out = np.empty((), dtype=object)
        out[()] = value
        return out
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (str, bytes)) for v in value):
        out = np.empty((len(value),), dtype=object)
        out[:] = value
        return out
    return np.asarray(value)


def collate_records(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray | None]:
    """Stack flat record dicts into a batch: ``{key: array [B, ...]}``.

    Texts become object arrays (``prompt`` [B], ``responses`` [B, K]); numbers are stacked.
    A key that is ``None`` in every record stays ``None``. Ragged values (e.g. K varying within
    a batch) raise ``ValueError``: pad them in ``map_fn`` or pass your own ``batch_fn``.
    """
    keys = list(records[0])
    if any(list(r) != keys for r in records):
        raise ValueError(f"records have different keys: {sorted({tuple(r) for r in records})}")
    batch: dict[str, np.ndarray | None] = {}
    for key in keys:
        values = [r[key] for r in records]
        if all(v is None for v in values):
            batch[key] = None
            continue
        if any(v is None for v in values):
            raise ValueError(f"field {key!r} is None in some records of the batch only")
        arrays = [_as_array(v) for v in values]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"field {key!r} has different shapes within a batch: "
                             f"{sorted(shapes)}; pad it in map_fn or pass a batch_fn")
        batch[key] = np.stack(arrays)
    return batch


def _grain_seed(seed: int) -> int:
    """Spread user seeds: grain seeds epoch e with ``seed + e``, so seeds 0 and 1 would overlap."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def preference_batches(source: Sequence[Any], *, batch_size: int, seed: int,
                       shuffle: bool = True, num_epochs: int | None = None,
                       shard_index: int = 0, shard_count: int = 1, even_shards: bool = True,
                       drop_remainder: bool = False,
                       map_fn: Callable[[Any], Any] | None = None,
                       batch_fn: Callable[[Sequence[Any]], Any] | None = collate_records
                       ) -> grain.MapDataset:
    """A random-access grain dataset of batches, indexed by global step.

    Order of operations (all lazy and index-based, so any step is a pure function of the
    arguments): per-epoch global shuffle of ``source`` (seeded by ``seed`` and the epoch) ->
    strided shard ``shard_index::shard_count`` (records in a shard differ between epochs; shards
    are disjoint within every epoch) -> ``map_fn`` per record -> batches of ``batch_size`` that
    never straddle epochs (the last one of an epoch is smaller unless ``drop_remainder``) ->
    ``num_epochs`` epochs (``None``: endless).

    Args:
      source: any random-access sequence of records, e.g. :func:`load_preference_source`.
      seed: shuffle seed; every host of a multi-host job must pass the same one.
      even_shards: drop ``len(source) % shard_count`` records per epoch (different ones each
        epoch when shuffling) so every shard has the same number of batches.
      map_fn: per-record hook (e.g. decode + tokenise); runs after sharding.
      batch_fn: how to stack records (``None``: grain's default, ``np.stack`` per leaf).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=_grain_seed(seed))
    if shard_count > 1:
        if even_shards:
            ds = ds[: len(ds) - len(ds) % shard_count]
        ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index}/{shard_count} of {len(source)} records is empty")
    if map_fn is not None:
        ds = ds.map(map_fn)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
    if len(ds) == 0:
        raise ValueError(f"fewer than batch_size={batch_size} records per shard "
                         f"with drop_remainder=True")
    return ds.repeat(num_epochs)


def preference_loader(source: Sequence[Any], *, batch_size: int, seed: int,
                      shuffle: bool = True, num_epochs: int | None = None,
                      shard_index: int = 0, shard_count: int = 1, even_shards: bool = True,
                      drop_remainder: bool = False,
                      map_fn: Callable[[Any], Any] | None = None,
                      batch_fn: Callable[[Sequence[Any]], Any] | None = collate_records,
                      read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator over :func:`preference_batches` (same arguments).

    ``it.get_state()`` returns a small JSON-able dict; a fresh loader built with the same
    arguments and given that state via ``it.set_state(state)`` yields exactly the batches the
    original would have yielded next. ``read_options`` controls grain's prefetch threads
    (``grain.ReadOptions(num_threads=0)`` reads synchronously).
    """
    ds = preference_batches(source, batch_size=batch_size, seed=seed, shuffle=shuffle,
                            num_epochs=num_epochs, shard_index=shard_index,
                            shard_count=shard_count, even_shards=even_shards,
                            drop_remainder=drop_remainder, map_fn=map_fn, batch_fn=batch_fn)
    return iter(ds.to_iter_dataset(read_options))


def steps_per_epoch(num_records: int, *, batch_size: int, shard_count: int = 1,
                    even_shards: bool = True, drop_remainder: bool = False) -> int:
    """Batches per epoch yielded by each shard (the largest shard if shards are uneven)."""
    per_shard = num_records // shard_count if even_shards else math.ceil(num_records / shard_count)
    return per_shard // batch_size if drop_remainder else math.ceil(per_shard / batch_size)
