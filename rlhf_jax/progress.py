"""Progress output every loop shares: a live bar on a terminal, plain lines in a log file.

On a terminal (stderr is a TTY) a loop shows a ``tqdm`` bar. When stderr is not a terminal (a log
file, CI, ``nohup``, a cluster scheduler) it prints plain lines instead: one every ``every`` steps
or every ``interval`` seconds, with step/total, steps/s, the ETA and the loop's main metrics::

    sft: step 40/200 (20%), 3.1 steps/s, ETA 52 s, loss=1.2345

Stages print their boundaries (:func:`stage`, :func:`reused`) and a resumed loop says where it
resumed (:func:`message`, from ``rlhf_jax.loop.resume``). :func:`set_quiet` (the scripts'
``--quiet``) turns all of it off. Only process 0 of a multi-host run prints.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Iterator

import jax

INTERVAL_S = 30.0
_quiet = False


def set_quiet(quiet: bool = True) -> None:
    """Turn every progress bar and line off (``--quiet``) or back on."""
    global _quiet
    _quiet = quiet


def _enabled() -> bool:
    return not _quiet and jax.process_index() == 0


def _is_tty(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def message(text: str) -> None:
    """One line on stderr (unless quiet)."""
    if _enabled():
        print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(name: str, out: str | Path) -> Iterator[None]:
    """``<name>: start → <out>`` before the block, ``<name>: done in 12.3 s`` after it (``failed
    after …`` when it raises)."""
    message(f"{name}: start → {out}")
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        message(f"{name}: failed after {time.perf_counter() - t0:.1f} s")
        raise
    message(f"{name}: done in {time.perf_counter() - t0:.1f} s")


def reused(name: str, out: str | Path) -> None:
    """Say that a stage's finished run is used as it is."""
    message(f"{name}: finished run in {out} reused")


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


class Progress:
    """Progress of one loop over steps ``initial … total``: ``update(step, **shown)`` after each
    step (``shown``: the main metrics, e.g. ``loss=…``, printed with the next line/bar refresh),
    ``close()`` at the end. A bar on a terminal, plain lines otherwise (module docstring)."""

    def __init__(self, desc: str, total: int, initial: int = 0, *, every: int | None = None,
                 interval: float = INTERVAL_S, stream=None):
        self.desc, self.total, self.initial = desc, total, initial
        self.stream = sys.stderr if stream is None else stream
        self.every = every or max(1, (total - initial) // 10)
        self.interval = interval
        self.shown: dict[str, float] = {}
        self.bar = None
        self.plain = _enabled() and not _is_tty(self.stream)
        if _enabled() and not self.plain:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                            leave=False, file=self.stream)
        self.t0 = self.t_last = time.perf_counter()
        self.last = initial

    def update(self, step: int, **shown: float) -> None:
        """Record that ``step`` steps are done (of ``total``)."""
        self.shown.update(shown)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if shown:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.shown.items()},
                                     refresh=False)
            return
        now = time.perf_counter()
        if self.plain and (step - self.last >= self.every or now - self.t_last >= self.interval
                           or step == self.total):
            self.last, self.t_last = step, now
            print(self.line(step, now), file=self.stream, flush=True)

    def line(self, step: int, now: float) -> str:
        rate = (step - self.initial) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        shown = "".join(f", {k}={v:.4g}" for k, v in self.shown.items())
        return (f"{self.desc}: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%), "
                f"{rate:.3g} steps/s, ETA {_duration(eta)}{shown}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
