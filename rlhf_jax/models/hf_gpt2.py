"""GPT-2 in Hugging Face's layout: ``GPT2LMHeadModel`` / ``GPT2ForSequenceClassification`` config
fields and tensor names, mapped to :class:`GPTConfig` and the NNX parameter tree of ``GPT``.

Traps handled here: published checkpoints store names with and without the ``transformer.`` prefix
and carry non-parameter buffers (``h.N.attn.bias``, ``h.N.attn.masked_bias``: allow-listed and
skipped at any shape and dtype — never read, and stored variously by old checkpoints — but only in
a layer the model has; ``hf.load_pretrained`` reports one of another layer as unexpected);
``lm_head.weight`` is absent when embeddings are tied (and omitted on export); Conv1D kernels are
already ``[in, out]`` as ours; the sequence-classification ``score.weight [1, D]`` has no bias.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Mapping

from rlhf_jax.configs import ConfigError
from rlhf_jax.models.config import GPTConfig
from rlhf_jax.models.hf_io import CheckpointError

MODEL_TYPES = ("gpt2",)
LM, BACKBONE, REWARD = "GPT2LMHeadModel", "GPT2Model", "GPT2ForSequenceClassification"
ARCHITECTURES: dict[str, tuple[str, ...]] = {LM: (), BACKBONE: (), REWARD: ("reward",)}
EMBEDDING = "wte.weight"   # the token embedding's canonical name (the tied output layer)
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")       # the tanh approximation GPT uses
_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
# GPTConfig field -> HF GPT2Config field
FIELDS = {"vocab_size": "vocab_size", "max_len": "n_positions", "d_model": "n_embd",
          "n_layers": "n_layer", "n_heads": "n_head", "d_ff": "n_inner",
          "ln_eps": "layer_norm_epsilon", "tie_embeddings": "tie_word_embeddings"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    path: tuple                  # NNX parameter path
    shape: tuple[int, ...]       # shape as stored by HF
    transpose: bool = False      # HF stores the transpose of our layout


def get_field(raw: Mapping, field: str, kind: type, default: Any, source: Path):
    """``raw[field]`` (or ``default`` when absent), which must be of ``kind`` (an int passes as a
    float, a bool never as a number; a float must be finite: Python's JSON reads ``Infinity``
    and ``NaN``); otherwise a :class:`CheckpointError` naming the field."""
    value = raw.get(field, default)
    ok = (isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
          or kind is float and isinstance(value, int) and not isinstance(value, bool))
    ok = ok and not (kind is float and not math.isfinite(value))
    if not ok:
        what = "a finite float" if kind is float else kind.__name__
        raise CheckpointError(f"{source}: field {field!r} must be {what}, got {value!r}")
    return value


def hf_names(message: str, fields: Mapping[str, str]) -> str:
    """``message`` with our config field names replaced by the checkpoint's (``fields``)."""
    for ours, hf in fields.items():
        message = re.sub(rf"\b{ours}\b", hf, message)
    return message


def architectures(model_type: str) -> tuple[str, str, str]:
    """``(causal LM, backbone, sequence classification)`` architecture names."""
    return LM, BACKBONE, REWARD


def is_reward(arch: str) -> bool:
    return arch == REWARD


def model_type_of(cfg: GPTConfig) -> str:
    return "gpt2"


def architecture_of(raw: Mapping, source: Path) -> str:
    archs = raw.get("architectures") or [LM]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise CheckpointError(f"{source}: field 'architectures' = {archs!r}: supported GPT-2 "
                              f"architectures are {sorted(ARCHITECTURES)}")
    return archs[0]


def config_from_hf(raw: Mapping, source: Path) -> tuple[GPTConfig, str, tuple[str, ...]]:
    """``(GPTConfig, architecture, scalar heads)`` of an HF GPT-2 ``config.json``; an unsupported
    or malformed field raises :class:`CheckpointError` naming it."""
    arch = architecture_of(raw, source)
    act = raw.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{source}: field 'activation_function' = {act!r}: GPT-2 here "
                              f"computes the tanh GELU, one of {ACTIVATIONS}")
    for field, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
        if get_field(raw, field, bool, want, source) != want:
            raise CheckpointError(f"{source}: field {field!r} = {raw[field]!r} is not supported "
                                  f"(only {want})")
    if arch == REWARD:
        labels = raw.get("num_labels", len(raw.get("id2label") or {0: 0}))
        if labels != 1:
            raise CheckpointError(f"{source}: field 'num_labels' = {labels!r}: a reward model "
                                  "has one output")
    for hf in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if hf not in raw:
            raise CheckpointError(f"{source}: field {hf!r} is missing")
    ints = {ours: get_field(raw, hf, int, None, source) for ours, hf in FIELDS.items()
            if ours in ("vocab_size", "max_len", "d_model", "n_layers", "n_heads")}
    try:
        cfg = GPTConfig(**ints,
                        d_ff=0 if raw.get("n_inner") is None else get_field(raw, "n_inner", int, 0,
                                                                        source),
                        ln_eps=float(get_field(raw, "layer_norm_epsilon", float, 1e-5, source)),
                        tie_embeddings=get_field(raw, "tie_word_embeddings", bool, True, source))
    except ConfigError as e:
        field, _, message = str(e).removeprefix("config field `").partition("`: ")
        raise CheckpointError(f"{source}: field {FIELDS.get(field, field)!r}: "
                              f"{hf_names(message, FIELDS)}") from None
    return cfg, arch, ARCHITECTURES[arch]


def config_to_hf(cfg: GPTConfig, arch: str, model_type: str = "gpt2",
                 base: Mapping | None = None) -> dict:
    """An HF GPT-2 ``config.json`` for ``cfg``; fields of ``base`` (an imported checkpoint's
    config) that do not describe the architecture are kept."""
    out = dict(base or {})
    out.update({"model_type": model_type, "architectures": [arch],
                **{hf: getattr(cfg, ours) for ours, hf in FIELDS.items()},
                "n_inner": cfg.d_ff or None, "n_ctx": cfg.max_len,
                "activation_function": out.get("activation_function", "gelu_new"),
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout})
    if arch == REWARD:
        out["num_labels"] = 1
        out.pop("id2label", None), out.pop("label2id", None)
    return out


def tensor_specs(cfg: GPTConfig, arch: str) -> dict[str, TensorSpec]:
    """HF tensor name (without the ``transformer.`` prefix) -> where it goes in our tree."""
    d, f, v = cfg.d_model, cfg.ff_dim, cfg.vocab_size
    specs = {"wte.weight": TensorSpec(("wte", "embedding"), (v, d)),
             "wpe.weight": TensorSpec(("wpe", "embedding"), (cfg.max_len, d)),
             "ln_f.weight": TensorSpec(("ln_f", "scale"), (d,)),
             "ln_f.bias": TensorSpec(("ln_f", "bias"), (d,))}
    for i in range(cfg.n_layers):
        for name, shape in (("ln_1", (d,)), ("ln_2", (d,))):
            specs[f"h.{i}.{name}.weight"] = TensorSpec(("h", i, name, "scale"), shape)
            specs[f"h.{i}.{name}.bias"] = TensorSpec(("h", i, name, "bias"), shape)
        for mod, (n_in, n_out) in (("attn.c_attn", (d, 3 * d)), ("attn.c_proj", (d, d)),
                                   ("mlp.c_fc", (d, f)), ("mlp.c_proj", (f, d))):
            path = ("h", i, *mod.split("."))
            specs[f"h.{i}.{mod}.weight"] = TensorSpec((*path, "kernel"), (n_in, n_out))
            specs[f"h.{i}.{mod}.bias"] = TensorSpec((*path, "bias"), (n_out,))
    if arch == LM and not cfg.tie_embeddings:
        specs["lm_head.weight"] = TensorSpec(("lm_head",), (v, d))
    if arch == REWARD:
        specs["score.weight"] = TensorSpec(("heads", "reward", "kernel"), (1, d), transpose=True)
    return specs


def canonical_name(name: str) -> str | None:
    """A stored tensor name without the ``transformer.`` prefix; None for an allow-listed buffer."""
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    return None if _BUFFER.match(name) else name


def stored_name(name: str) -> str:
    """The name transformers' ``save_pretrained`` writes for canonical ``name``."""
    return name if name in ("lm_head.weight", "score.weight") else f"transformer.{name}"
