"""Resumable batching of preference records with grain.

:func:`preference_loader` builds a grain pipeline (global shuffle per epoch from a seed,
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

import math
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np


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


# per-record values of varying shape, batched as an object array [B] of the records' values
RAGGED = ("response_ids",)


def collate_records(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray | None]:
    """Stack flat record dicts into a batch: ``{key: array [B, ...]}``.

    Texts become object arrays (``prompt`` [B], ``responses`` [B, K]); numbers are stacked.
    A key that is ``None`` in every record stays ``None``. ``response_ids`` (each record's K
    lists of sampled ids, or ``None``) becomes an object array [B] of the records' values as
    they are. Other ragged values (e.g. K varying within a batch) raise ``ValueError``: pad them
    in ``map_fn`` or pass your own ``batch_fn``.
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
        if key in RAGGED:
            out = np.empty((len(values),), dtype=object)
            for i, v in enumerate(values):
                out[i] = v
            batch[key] = out
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
