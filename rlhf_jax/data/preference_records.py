"""The preference record: one K-wise comparison (pairwise data is the K = 2 case), its TFDS
features, validation that names the bad field, and conversions.

Record schema::

    id         text          unique within a split, stable (e.g. "helpful-base/train:17")
    prompt     text
    responses  K texts       K >= 2
    ranking    K float32     higher = preferred; equal scores = tie
    gold       K float32     optional (stored as an empty vector when absent); evaluation only
    response_ids  K int32 sequences (ragged)  optional (stored as no sequences when absent): the
               token ids each response was sampled as (every id before EOS), so
               a reader with the same tokenizer trains on what the policy wrote, not on the
               canonical encoding of its text (which can differ: :mod:`rlhf_jax.data.bpe`)

A pair ``{"prompt", "chosen", "rejected"}`` becomes ``responses=[chosen, rejected]``,
``ranking=[1.0, 0.0]`` (:func:`pair_to_record`).

Identical responses carry no preference between them: the file parsers leave out (and count) a pair
whose two responses are identical, and the K-wise labeller ties identical samples
(:func:`rlhf_jax.labeler.tie_identical`), so :func:`ranked_pairs` gives no pair between them. A
record may still hold identical responses with different scores: in binary-feedback records
(:mod:`rlhf_jax.data.binary_feedback`) each response's score is its own, independent label.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data.preference_formats import PathLike, PreferenceDataError

TEXT_FIELDS = ("id", "prompt")



def preference_features() -> tfds.features.FeaturesDict:
    """The TFDS feature spec of a K-wise preference record."""
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "prompt": tfds.features.Text(),
        "responses": tfds.features.Sequence(tfds.features.Text()),
        "ranking": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "gold": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        # bytes-encoded rows: a ragged Sequence of int tensors without TensorFlow
        "response_ids": tfds.features.Sequence(tfds.features.Tensor(
            shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES)),
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


def _token_ids(value: Any, k: int, where: str) -> list[list[int]]:
    """``value`` as ``k`` lists of int32 token ids (``>= 0``), one per response."""
    def is_list(x: Any) -> bool:
        return isinstance(x, (Sequence, np.ndarray)) and not isinstance(x, (str, bytes))

    if not is_list(value) or len(value) != k:
        raise PreferenceDataError(f"expected {k} lists of token ids (one per response), got "
                                  f"{value!r}", path=where, field="response_ids")
    out = []
    for i, row in enumerate(value):
        if not is_list(row) or not all(isinstance(x, (int, np.integer))
                                       and not isinstance(x, bool) for x in row):
            raise PreferenceDataError(f"expected a list of int token ids, got {row!r}",
                                      path=where, field=f"response_ids[{i}]")
        row = [int(x) for x in row]
        if not all(0 <= x < 2 ** 31 for x in row):
            raise PreferenceDataError(f"token ids must be in [0, 2**31), got {row}",
                                      path=where, field=f"response_ids[{i}]")
        out.append(row)
    return out


def validate_record(record: Mapping[str, Any], *, where: str = "record") -> dict[str, Any]:
    """Check a K-wise record and return it normalised.

    Returns ``{"id": str, "prompt": str, "responses": list[str], "ranking": float32[K],
    "gold": float32[K] | None, "response_ids": list[list[int]] | None}``. Errors are
    :class:`PreferenceDataError` naming ``where`` and the field.
    """
    if not isinstance(record, Mapping):
        raise PreferenceDataError(f"expected a dict, got {type(record).__name__}", path=where)
    unknown = set(record) - {"id", "prompt", "responses", "ranking", "gold", "response_ids"}
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
    gold, ids = record.get("gold"), record.get("response_ids")
    return {
        "id": record["id"],
        "prompt": record["prompt"],
        "responses": list(responses),
        "ranking": _scores(record["ranking"], k, "ranking", where),
        "gold": None if gold is None else _scores(gold, k, "gold", where),
        "response_ids": None if ids is None else _token_ids(ids, k, where),
    }


def make_record(*, id: str, prompt: str, responses: Sequence[str],  # noqa: A002 (schema name)
                ranking: Sequence[float], gold: Sequence[float] | None = None,
                response_ids: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """A validated K-wise record (see :func:`validate_record`)."""
    return validate_record({"id": id, "prompt": prompt, "responses": responses,
                            "ranking": ranking, "gold": gold, "response_ids": response_ids})


def pair_to_record(pair: Mapping[str, str]) -> dict[str, Any]:
    """``{"id", "prompt", "chosen", "rejected"}`` -> K = 2 record with ranking ``[1, 0]``."""
    return make_record(id=pair["id"], prompt=pair["prompt"],
                       responses=[pair["chosen"], pair["rejected"]], ranking=[1.0, 0.0])


def to_example(record: Mapping[str, Any]) -> dict[str, Any]:
    """A validated record in the form TFDS encodes (absent gold -> empty vector, absent
    response ids -> no sequences)."""
    gold, ids = record["gold"], record["response_ids"]
    return {**record, "gold": np.zeros((0,), np.float32) if gold is None else gold,
            "response_ids": [np.asarray(r, np.int32) for r in ids or ()]}


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def decode_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A record read back from TFDS (bytes, empty gold, no response ids) in
    :func:`validate_record` form; a data set stored before ``response_ids`` existed has no such
    feature, and reads as records without them."""
    gold = np.asarray(raw["gold"], np.float32)
    ids = raw.get("response_ids")
    return {
        "id": _text(raw["id"]),
        "prompt": _text(raw["prompt"]),
        "responses": [_text(r) for r in raw["responses"]],
        "ranking": np.asarray(raw["ranking"], np.float32),
        "gold": None if gold.size == 0 else gold,
        "response_ids": [[int(x) for x in r] for r in ids] if ids is not None and len(ids)
        else None,
    }


def ranked_pairs(ranking: Sequence[float]) -> list[tuple[int, int]]:
    """All ``(i, j)`` with response ``i`` strictly preferred to ``j``; ties give no pair.

    For reward-model training on K-wise data (every ordered, non-tied pair of a ranking).
    """
    r = np.asarray(ranking)
    return [(i, j) for i in range(len(r)) for j in range(len(r)) if r[i] > r[j]]


def canonical_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able form of a validated record, for content hashing (``response_ids`` only when
    present, so a record without them hashes as it did before the field existed)."""
    gold, ids = record["gold"], record.get("response_ids")
    out = {"id": record["id"], "prompt": record["prompt"], "responses": record["responses"],
           "ranking": [float(x) for x in record["ranking"]],
           "gold": None if gold is None else [float(x) for x in gold]}
    return out if ids is None else {**out, "response_ids": [list(r) for r in ids]}


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
