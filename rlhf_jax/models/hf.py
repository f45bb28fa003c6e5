"""Hugging Face checkpoints in and out, named like the ``transformers`` functions (GPT-2 and the
Llama family: Llama, Qwen2, Qwen3)::

    model, params = load_pretrained("path/to/checkpoint")      # config.json + *.safetensors
    out = model.apply(params, tokens, attention_mask=mask)      # ModelOutput; .logits [B, T, V]
    save_pretrained("path/to/export", model, params)            # transformers loads it unchanged

Loading checks the config and every tensor's name, shape and dtype before any data is read, and
builds the parameters only when everything checked out (nothing is half-loaded); errors name the
file and the tensor or field (:class:`CheckpointError`). Weights are computed in float32 whatever
the stored dtype (f32, f16 or bf16, read without torch); export writes the stored dtype again
(float32 when the tensors' dtypes differ), or the one asked for. Dropout is 0 after import (as in
RLHF training, so that sampler and trainer log-probs agree); the checkpoint's own rates are kept in
``model.source.config``.

Reward models (``GPT2ForSequenceClassification``: ``score.weight [1, D]``, no bias) import as a
``"reward"`` scalar head with a zero bias. **Where the reward is read.** transformers reads the
score at the rightmost token whose *id* differs from ``pad_token_id``; rlhf_jax reads it at the
last position whose *attention mask* is 1 (``ops.last_token_index``: the EOS when the
response has one). The two agree when ``pad_token_id`` is distinct from every real token; with
GPT-2's convention pad == eos, transformers skips a trailing EOS and reads one token earlier, so
give an exported reward model a pad id of its own to get the same scores. A head bias and a reward
normalisation ``gain · r + bias`` are folded into the exported weights exactly: the gain into
``score.weight``; for GPT-2 the constant into ``ln_f.bias`` along ``score.weight``, which a sequence
classifier uses for nothing else (a Llama-family final RMSNorm has no bias, so there a non-zero
constant is refused). Any other non-zero scalar head (the LM-likelihood readout) has no place in
the HF layout, and export refuses rather than change the scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models import hf_gpt2, hf_llama
from rlhf_jax.models.config import GPTConfig, LlamaConfig
from rlhf_jax.models.functional import Model, build_module
from rlhf_jax.models.hf_io import (DTYPES, INDEX, NUMPY_DTYPES, SAFETENSORS, CheckpointError,
                                   read_headers, read_json, read_tensor, weight_files,
                                   write_json, write_safetensors)

__all__ = ["CheckpointError", "HFSource", "file_digests", "load_config", "load_pretrained",
           "save_pretrained"]

# a per-layer tensor's layer index (GPT-2 ``h.N.``, Llama ``layers.N.``, either under a prefix)
_LAYER = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")
# model_type -> the module that maps its config and tensor names (the same interface for each)
FAMILIES = {t: fam for fam in (hf_gpt2, hf_llama) for t in fam.MODEL_TYPES}
FAMILY_OF_CONFIG = {GPTConfig: hf_gpt2, LlamaConfig: hf_llama}

# model types whose tokenizer transformers 5 picks by model_type, never by tokenizer_config.json
# (its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS): a tokenizer built here is misread there
TOKENIZER_BY_MODEL_TYPE = {"qwen2": "Qwen2Tokenizer"}


@dataclasses.dataclass(frozen=True)
class HFSource:
    """Where an imported model came from (``Model.source``)."""

    path: str
    architecture: str
    dtype: str                        # stored weight dtype: "float32", "float16" or "bfloat16"
    #                                   ("float32" when the stored tensors' dtypes differ)
    config: dict[str, Any]            # the checkpoint's config.json as read


def file_digests(path: str | Path) -> dict[str, str]:
    """sha256 of every file in checkpoint directory ``path`` (name -> hex digest)."""
    out = {}
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[f.name] = h.hexdigest()
    return out


def _family(raw: dict, source: Path):
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"{source}: field 'model_type' = {model_type!r}: supported model "
                              f"types are {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def load_config(path: str | Path) -> tuple[Any, str, tuple[str, ...]]:
    """``(model config, architecture, scalar heads)`` of the HF checkpoint directory ``path``,
    from its ``config.json`` alone (no weights read)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg_file = path / "config.json"
    raw = read_json(cfg_file)
    fam = _family(raw, cfg_file)
    cfg, arch, heads = fam.config_from_hf(raw, cfg_file)
    if arch != fam.architectures(raw["model_type"])[0]:   # no output layer in the checkpoint:
        cfg = cfg.replace(tie_embeddings=True)            # the embedding serves (none invented)
    return cfg, arch, heads


def load_pretrained(path: str | Path, *, allow_torch_bin: bool = False
                    ) -> tuple[Model, nnx.State]:
    """``(Model, params)`` of the HF checkpoint directory ``path``.

    ``allow_torch_bin`` lets a directory with only ``pytorch_model.bin`` load through
    ``torch.load(weights_only=True)`` (needs torch); by default only safetensors are read.
    """
    path = Path(path)
    cfg, arch, heads = load_config(path)
    raw = read_json(path / "config.json")
    fam = FAMILIES[raw["model_type"]]
    lm_arch = fam.architectures(raw["model_type"])[0]
    specs = fam.tensor_specs(cfg, arch)
    files = weight_files(path, allow_torch_bin=allow_torch_bin)
    where = next(iter(files)) if len(files) == 1 else path / INDEX

    stored = {}
    for name, info in read_headers(files).items():
        canon = fam.canonical_name(name)
        if canon is None:   # a buffer (GPT-2's causal mask, Llama's rotary frequencies): skipped
            layer = _LAYER.search(name)   # in a layer the model has, else an unexpected tensor
            if not layer or int(layer[1]) < cfg.n_layers:
                continue
            canon = name
        if canon in stored:
            raise CheckpointError(f"{info.file}: tensors {stored[canon][0]!r} and {name!r} are "
                                  f"the same parameter {canon!r}")
        stored[canon] = (name, info)
    # a tied checkpoint may still carry the output matrix: accepted only as an exact copy
    tied_copy = stored.pop("lm_head.weight") if (
        "lm_head.weight" in stored and "lm_head.weight" not in specs
        and cfg.tie_embeddings and arch == lm_arch) else None
    missing = [n for n in specs if n not in stored]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {fam.stored_name(missing[0])!r}{more} "
                              f"that {arch} with this config.json needs")
    for canon, (name, info) in stored.items():
        if canon not in specs:
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r}: not a parameter of "
                                  f"{arch} with this config.json")
        if info.shape != specs[canon].shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                  f"config.json implies {list(specs[canon].shape)}")
        if info.dtype not in DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}; "
                                  f"weights must be one of {sorted(DTYPES)}")

    values = {}
    for canon, spec in specs.items():
        name, info = stored[canon]
        arr = np.asarray(read_tensor(name, info), np.float32)
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{info.file}: tensor {name!r} holds non-finite values")
        values[spec.path] = arr.T if spec.transpose else arr
    if tied_copy is not None and not np.array_equal(
            np.asarray(read_tensor(*tied_copy), np.float32), values[specs[fam.EMBEDDING].path]):
        raise CheckpointError(f"{tied_copy[1].file}: tensor {tied_copy[0]!r} differs from the "
                              "token embedding although config.json ties them")
    if "reward" in heads:
        values[("heads", "reward", "bias")] = np.zeros((1,), np.float32)

    module = nnx.eval_shape(lambda: build_module(cfg, nnx.Rngs(0), heads))
    graphdef, abstract = nnx.split(module)
    flat = [(p, var.replace(jnp.asarray(values[p]))) for p, var in nnx.to_flat_state(abstract)]
    # the stored dtype, which export writes again; float32 (lossless) when tensors differ, e.g.
    # f32 norms beside bf16 matrices: a bf16 export rounded the norms (max |Δ logits| 3.7e-3)
    dtypes = {info.dtype for _, info in stored.values()}
    source = HFSource(str(path), arch, DTYPES[dtypes.pop() if len(dtypes) == 1 else "F32"][1],
                      raw)
    return Model(cfg, graphdef, heads, source), nnx.from_flat_state(flat)


def save_pretrained(path: str | Path, model: Model, params: nnx.State, *,
                    architecture: str | None = None, dtype: str | None = None,
                    reward_norm: tuple[float, float] = (1.0, 0.0), tokenizer=None) -> None:
    """Write ``params`` as an HF checkpoint (``config.json`` + ``model.safetensors``) to ``path``.

    Args:
      architecture: ``"GPT2LMHeadModel"`` (default without scalar heads) or
        ``"GPT2ForSequenceClassification"`` (default with a ``"reward"`` head). A model with
        other heads must name it; only that architecture's parameters are written.
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default: the dtype the model was
        imported with, else float32.
      reward_norm: ``(gain, bias)`` of a reward normalisation ``gain · r + bias`` to fold into a
        reward model's weights (exactly; see the module docstring).
      tokenizer: optional; its ``bos_id`` / ``eos_id`` (all its ``eos_ids`` when it has several)
        / ``pad_id`` go into ``config.json`` and,
        when it has ``hf_tokenizer()``, its ``tokenizer.json`` and ``tokenizer_config.json``
        are written too.
    """
    path = Path(path)
    heads = set(model.heads)
    fam = FAMILY_OF_CONFIG[type(model.cfg)]
    base = dict(model.source.config) if model.source is not None else {}
    model_type = base.get("model_type") or fam.model_type_of(model.cfg)
    lm, _, reward = fam.architectures(model_type)
    arch = architecture or (reward if "reward" in heads else lm if not heads else None)
    if arch not in (lm, reward):
        raise ValueError(f"architecture={architecture!r}: a model with heads {sorted(heads)} needs "
                         f"one of {[lm, reward]}")
    if arch == reward and "reward" not in heads:
        raise ValueError(f"{arch} needs a 'reward' head; the model has {sorted(heads)}")
    dtype = dtype or (model.source.dtype if model.source is not None else "float32")
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(NUMPY_DTYPES)}")
    flat = {p: np.asarray(v.get_value(), np.float32) for p, v in nnx.to_flat_state(params)}
    if arch == reward:
        flat = _fold_reward(flat, heads, reward_norm)

    tensors = {}
    for canon, spec in fam.tensor_specs(model.cfg, arch).items():
        arr = flat[spec.path].T if spec.transpose else flat[spec.path]
        name = fam.stored_name(canon)
        with np.errstate(over="ignore"):
            tensors[name] = arr.astype(NUMPY_DTYPES[dtype])
        if not np.isfinite(tensors[name]).all():   # float16 tops out at 65504
            raise ValueError(f"tensor {name!r} does not fit {dtype} (largest |value| "
                             f"{float(np.abs(arr).max()):.6g}); export it in another dtype")
    config = fam.config_to_hf(model.cfg, arch, model_type, base)
    if arch == reward and "tie_word_embeddings" in base:   # meaningless for a classifier: as read
        config["tie_word_embeddings"] = base["tie_word_embeddings"]
    config["dtype"] = config["torch_dtype"] = dtype   # transformers >= 4.56 reads "dtype"
    if tokenizer is not None:   # every EOS of an imported list, so that generate stops at each
        eos = tuple(getattr(tokenizer, "eos_ids", ())) or (tokenizer.eos_id,)
        config.update(bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id,
                      eos_token_id=list(eos) if len(eos) > 1 else eos[0])
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / SAFETENSORS, tensors)
    write_json(path / "config.json", config)
    if tokenizer is not None and hasattr(tokenizer, "hf_tokenizer"):
        tokenizer.hf_tokenizer().save(str(path / "tokenizer.json"))
        write_json(path / "tokenizer_config.json", tokenizer.tokenizer_config())
        if model_type in TOKENIZER_BY_MODEL_TYPE and getattr(tokenizer, "config", None) is None:
            warnings.warn(
                f"{path}: transformers 5's AutoTokenizer reads a {model_type} checkpoint's "
                f"tokenizer.json as {TOKENIZER_BY_MODEL_TYPE[model_type]} (byte-level BPE), "
                "whatever tokenizer_config.json names, and this tokenizer was built here: load it "
                "with PreTrainedTokenizerFast(tokenizer_file=.../tokenizer.json) instead",
                stacklevel=2)


def _fold_reward(flat: dict, heads: set[str], reward_norm: tuple[float, float]) -> dict:
    """Parameters whose ``score`` head alone (no bias) gives ``gain · r + bias``."""
    for h in sorted(heads - {"reward"}):
        if any(np.any(v != 0) for p, v in flat.items() if p[:2] == ("heads", h)):
            raise ValueError(
                f"scalar head {h!r} is not all zeros: its readout (e.g. the reward model's "
                "LM-likelihood term c·log p(response)) has no place in an HF "
                "GPT2ForSequenceClassification, and dropping it would change the scores")
    gain, shift = (float(x) for x in reward_norm)
    w = flat[("heads", "reward", "kernel")].astype(np.float64)[:, 0] * gain      # [D]
    const = gain * float(flat[("heads", "reward", "bias")][0]) + shift
    flat = dict(flat)
    flat[("heads", "reward", "kernel")] = w[:, None].astype(np.float32)
    if const != 0.0:
        norm2 = float(w @ w)
        if ("ln_f", "bias") not in flat:
            raise ValueError(
                f"a reward constant {const!r} (head bias and normalisation shift) cannot be folded "
                "into this model: its final RMSNorm has no bias and HF's score layer has none. A "
                "constant shift leaves Bradley-Terry preferences unchanged; pass reward_norm="
                "(gain, shift) with gain * head bias + shift == 0 to export r - const")
        if norm2 == 0.0:
            raise ValueError("the reward head's kernel is zero, so its constant "
                             f"{const!r} cannot be folded into the final LayerNorm")
        flat[("ln_f", "bias")] = (flat[("ln_f", "bias")].astype(np.float64)
                                  + const * w / norm2).astype(np.float32)
    return flat
