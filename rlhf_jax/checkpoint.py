"""One small wrapper over Orbax's ``CheckpointManager`` used by every stage.

A checkpoint holds a pytree (``TrainState``: params, optimizer state, step — or any pytree) and a
JSON side-car for host-side state (PRNG key data, data position, controller state). Orbax writes to
a temporary directory and renames it when complete, so a kill mid-save leaves the previous
checkpoint as the latest restorable one. A finished stage's parameters (:func:`save_params`) are
written beside the old ones and swapped in by renames, so a kill leaves the old or the new ones.
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


def _aside(path: Path, kind: str) -> Path:
    """``path``'s sibling ``.<name>.<kind>``: ``tmp`` (a new save), ``old`` (the one it
    replaces), ``del`` (being deleted)."""
    return path.with_name(f".{path.name}.{kind}")


def _complete(path: Path) -> bool:
    """Whether Orbax finished saving ``path``: it writes ``commit_success.txt`` last (then
    renames ``<name>.orbax-checkpoint-tmp*`` to ``<name>`` on a local disk)."""
    return (path / "commit_success.txt").is_file()


def _discard(path: Path, trash: Path) -> None:
    """Delete directory ``path`` after renaming it ``trash``: a kill mid-delete leaves no partial
    directory under a name that is read."""
    shutil.rmtree(trash, ignore_errors=True)
    if path.exists():
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _settled(path: Path) -> Path:
    """The complete parameters at ``path``: ``path`` itself, or, after a kill between the two
    renames of :func:`save_params` (``path`` moved aside, the new save not yet moved in), the new
    save, else the old one."""
    if path.exists():
        return path
    new, old = _aside(path, "tmp"), _aside(path, "old")
    return new if _complete(new) else old if old.is_dir() else path


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Write a finished stage's parameters (synchronously) to ``path``, replacing any there.

    Atomic: the new parameters are saved beside the old ones (``.<name>.tmp``), then the old ones
    are renamed aside (``.<name>.old``), the new ones renamed in and the old ones deleted. A kill
    at any point leaves ``path`` with the old or the new parameters, or (between the two renames)
    no ``path`` but both complete beside it: :func:`load_params` reads the new ones and the next
    save finishes the swap. Leftovers of a killed save are deleted first."""
    path = Path(path).resolve()
    new, old, trash = _aside(path, "tmp"), _aside(path, "old"), _aside(path, "del")
    primary = jax.process_index() == 0
    if primary:
        settled = _settled(path)
        if settled != path:            # a kill between the renames: finish that swap
            os.rename(settled, path)
        for leftover in (new, old, *path.parent.glob(f"{new.name}.orbax-checkpoint-tmp*"),
                         *path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*")):
            _discard(leftover, trash)  # a killed save's (Orbax's own partial ones included)
        shutil.rmtree(trash, ignore_errors=True)
    _sync("save_params:clean")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(new, params)
        ckptr.wait_until_finished()
    if primary:
        if path.exists():
            os.rename(path, old)
        os.rename(new, path)
        _discard(old, trash)
    _sync("save_params:swapped")


def load_params(path: str | os.PathLike, target: Any) -> Any:
    """Read parameters saved by :func:`save_params` into the structure of ``target`` (also
    after a kill between its two renames, when they are beside ``path``)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(_settled(Path(path).resolve()), abstract)
