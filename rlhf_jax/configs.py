"""Frozen, self-validating config dataclasses: the shared checks every stage's config uses."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


class ConfigError(ValueError):
    """A config field is out of range or inconsistent; the message names the field."""


SEED_LIMIT = 2**32   # seeds are in [0, SEED_LIMIT): what jax.random.key tells apart


def check(condition: bool, field: str, message: str) -> None:
    """Raise ``ConfigError`` naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"config field `{field}`: {message}")


def check_numbers(cfg: Any, prefix: str = "") -> None:
    """Every float field of ``cfg`` (nested configs too) is finite and every seed (a field named
    ``…seed``, or each of ``…seeds``) is in [0, 2**32); a ``ConfigError`` names the dotted field
    otherwise (NaN or ±inf is never a meaningful setting and would pass ``x > 0``-style range
    checks unnoticed; ``jax.random.key`` keeps a seed's low 32 bits, so 2**32 would silently be
    seed 0's random streams and -1 those of 2**32 - 1)."""
    for f in dataclasses.fields(cfg):
        v, name = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            check_numbers(v, name + ".")
        elif isinstance(v, float):
            check(math.isfinite(v), name, f"must be a finite number, got {v!r}")
        elif f.name.endswith(("seed", "seeds")):
            for s in v if isinstance(v, tuple) else (v,):
                if isinstance(s, int) and not isinstance(s, bool):
                    check(0 <= s < SEED_LIMIT, name, f"must be in [0, 2**32), got {s}")


def positive(cfg: Any, *fields: str) -> None:
    for f in fields:
        v = getattr(cfg, f)
        check(v > 0, f, f"must be > 0, got {v!r}")


def non_negative(cfg: Any, *fields: str) -> None:
    for f in fields:
        v = getattr(cfg, f)
        check(v >= 0, f, f"must be >= 0, got {v!r}")


def in_unit_interval(cfg: Any, *fields: str, closed: bool = True) -> None:
    for f in fields:
        v = getattr(cfg, f)
        ok = (0.0 <= v <= 1.0) if closed else (0.0 <= v < 1.0)
        check(ok, f, f"must be in [0, 1{']' if closed else ')'}, got {v!r}")


def to_dict(cfg: Any) -> dict:
    """Nested dict of a (possibly nested) config dataclass, JSON-serialisable."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a (nested) frozen config dataclass from :func:`to_dict` output."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        t = hints[f.name]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)
