"""One small wrapper over Orbax's ``CheckpointManager`` used by every stage.

A checkpoint holds a pytree (``TrainState``: params, optimizer state, step — or any pytree) and a
JSON side-car for host-side state (PRNG key data, data position, controller state). Orbax writes to
a temporary directory and renames it when complete, so a kill mid-save leaves the previous
checkpoint as the latest restorable one.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

FAULT_KILL_AT_SAVE = "RLHF_JAX_FAULT_KILL_AT_SAVE"
"""Test hook: ``kill -9`` this process right after starting the asynchronous save of that step."""


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2,
                 async_save: bool = True):
        self.directory = Path(directory).resolve()
        if jax.process_index() == 0 and self.directory.is_dir():
            for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):   # a killed save's
                shutil.rmtree(partial, ignore_errors=True)
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def save(self, step: int, state: Any, extra: dict | None = None) -> None:
        """Start saving ``state`` (a pytree) and ``extra`` (JSON) as ``step``.

        Device arrays are copied to the host before this returns, so the caller may donate
        ``state`` to the next step at once; the files are written in the background."""
        self._mgr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {})), force=True)
        if os.environ.get(FAULT_KILL_AT_SAVE) == str(step):   # fault-injection hook for tests
            os.kill(os.getpid(), signal.SIGKILL)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into the structure of ``target`` (arrays or ``jax.ShapeDtypeStruct``s)."""
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        return out["state"], dict(out["extra"] or {})

    def extra(self, step: int | None = None) -> dict:
        """The JSON side-car of ``step`` (default the latest; ``{}`` when there is none), without
        restoring the state."""
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            return {}
        out = self._mgr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(out["extra"] or {})

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Write a finished stage's parameters (synchronously) to ``path``."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(path).resolve(), params, force=True)


def load_params(path: str | os.PathLike, target: Any) -> Any:
    """Read parameters saved by :func:`save_params` into the structure of ``target``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).resolve(), abstract)
