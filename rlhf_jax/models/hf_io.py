"""Reading and writing Hugging Face weight files, treating every checkpoint as untrusted input.

Weights come from ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (the
``safetensors`` library, numpy backend: bf16 / f16 arrive as ``ml_dtypes`` arrays, no torch). A
``pytorch_model.bin`` is a pickle: it is read only when asked for (``allow_torch_bin``) and only
through ``torch.load(weights_only=True)``, which refuses to build arbitrary objects; nothing else is
ever unpickled. Headers (names, shapes, dtypes) are read and checked before any tensor data, and
every error names the file and the tensor or field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"

# safetensors dtype tag -> (numpy dtype, HF ``torch_dtype`` name); weights must be one of these
DTYPES: dict[str, tuple[np.dtype, str]] = {
    "F32": (np.dtype(np.float32), "float32"),
    "F16": (np.dtype(np.float16), "float16"),
    "BF16": (np.dtype(ml_dtypes.bfloat16), "bfloat16"),
}
NUMPY_DTYPES = {name: dt for dt, name in DTYPES.values()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and tensor or field."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str                  # safetensors tag (F32, F16, BF16, ...)
    data: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    # ``data``: already in memory (a torch ``.bin`` has no header to read first)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a :class:`CheckpointError` naming it."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def weight_files(path: Path, *, allow_torch_bin: bool = False) -> dict[Path, list[str] | None]:
    """The weight files of checkpoint directory ``path``, each with the tensor names the index
    assigns to it (None for a single unindexed file)."""
    if (path / SAFETENSORS).is_file():
        return {path / SAFETENSORS: None}
    index = path / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: field 'weight_map' must be a non-empty object "
                                  "mapping tensor names to shard files")
        shards: dict[Path, list[str]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or fname in ("", ".", "..") or Path(fname).name != fname:
                raise CheckpointError(f"{index}: weight_map[{name!r}] = {fname!r} is not a file "
                                      "name inside the checkpoint directory")
            shards.setdefault(path / fname, []).append(name)
        return shards
    if (path / TORCH_BIN).is_file():
        if not allow_torch_bin:
            raise CheckpointError(
                f"{path / TORCH_BIN}: a pickle file, not loaded by default (a pickle can run code); "
                "convert the checkpoint to safetensors, or pass allow_torch_bin=True to read it "
                "with torch.load(weights_only=True)")
        return {path / TORCH_BIN: None}
    raise CheckpointError(f"{path}: no {SAFETENSORS}, {INDEX} or {TORCH_BIN}")


def read_headers(files: Mapping[Path, list[str] | None]) -> dict[str, TensorInfo]:
    """Name -> shape and dtype of every stored tensor, from the files' headers only (a torch
    ``.bin`` has no header: it is loaded whole, safely). Checks the index against the shards."""
    infos: dict[str, TensorInfo] = {}
    for file, listed in files.items():
        if file.name == TORCH_BIN:
            for name, arr in _torch_bin(file).items():
                infos[name] = TensorInfo(file, tuple(arr.shape), _tag(arr.dtype), arr)
            continue
        found = _safetensors_header(file)
        if listed is not None:
            for name in sorted(set(listed) - set(found)):
                raise CheckpointError(f"{file}: tensor {name!r} is listed in {INDEX} but not "
                                      "stored in this shard")
            for name in sorted(set(found) - set(listed)):
                raise CheckpointError(f"{file}: tensor {name!r} is stored in this shard but "
                                      f"{INDEX} does not list it here")
        for name, info in found.items():
            if name in infos:
                raise CheckpointError(f"{file}: tensor {name!r} is also stored in "
                                      f"{infos[name].file.name}")
            infos[name] = info
    return infos


def read_tensor(name: str, info: TensorInfo) -> np.ndarray:
    """The data of one tensor (its stored dtype; bf16 as ``ml_dtypes.bfloat16``)."""
    if info.data is not None:
        return info.data
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(info.file, framework="numpy") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{info.file}: tensor {name!r} could not be read ({e})") from None


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` as one safetensors file with transformers' metadata, atomically (a
    temporary file renamed into place: a crash leaves the previous file or none), readable as
    any new file is under the process's umask (the safetensors library creates it 0600)."""
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    """The process's umask, read without changing it (other threads may be creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)   # no /proc: the only portable read sets it, so set it right back
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tag(dtype: np.dtype) -> str:
    for tag, (dt, _) in DTYPES.items():
        if dt == dtype:
            return tag
    return str(dtype)


def _safetensors_header(file: Path) -> dict[str, TensorInfo]:
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        with safe_open(file, framework="numpy") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = TensorInfo(file, tuple(int(d) for d in sl.get_shape()),
                                       str(sl.get_dtype()))
            return out
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); truncated or "
                              "corrupt?") from None


def _torch_bin(file: Path) -> dict[str, np.ndarray]:
    """Tensors of a torch pickle via ``torch.load(weights_only=True)`` (no arbitrary objects)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{file}: reading a pickle checkpoint needs torch (pip install "
                              "torch), or convert it to safetensors") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError for refused or bad data
        raise CheckpointError(f"{file}: refused or unreadable by torch.load(weights_only=True) "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a mapping of tensor names to tensors")
    out = {}
    for name, t in state.items():
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = t.numpy()
    return out
