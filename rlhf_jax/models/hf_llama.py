"""The Llama family in Hugging Face's layout (``llama``, ``qwen2``, ``qwen3`` model types): config
fields and tensor names mapped to :class:`LlamaConfig` and the NNX tree of ``Llama``.

Config forms in use are both read: rotary settings as top-level ``rope_theta`` / ``rope_scaling``
(most published checkpoints) or as the ``rope_parameters`` dict transformers 5 writes (a non-empty
``rope_scaling`` first, as transformers reads them); ``dtype`` or ``torch_dtype``. Rotary types
other than "default" and "llama3" (yarn, linear, dynamic, …), partial rotary factors and
sliding-window layers are refused by name rather than computed differently. Biases are not a config
field everywhere: Qwen2 has q/k/v biases and an unbiased output projection by architecture; Llama's
``attention_bias`` covers q/k/v/o and ``mlp_bias`` the MLP; Qwen3 has ``attention_bias`` and
per-head q/k RMSNorms. ``nn.Linear`` weights are ``[out, in]``, ours ``[in, out]``: transposed both
ways. Buffers ``rotary_emb.inv_freq`` (per layer, or the model's one) are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from rlhf_jax.configs import ConfigError
from rlhf_jax.models.config import LlamaConfig
from rlhf_jax.models.hf_gpt2 import TensorSpec, get_field, hf_names
from rlhf_jax.models.hf_io import CheckpointError

MODEL_TYPES = ("llama", "qwen2", "qwen3")
_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
EMBEDDING = "embed_tokens.weight"   # the token embedding's canonical name (the tied output layer)
_BUFFER = re.compile(r"^(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")   # per layer (old)
_ROPE_TYPES = ("default", "llama3")
# LlamaConfig field -> HF field, with HF's default when the field is absent (None: required)
FIELDS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("vocab_size", None), "d_model": ("hidden_size", None),
    "n_layers": ("num_hidden_layers", None), "n_heads": ("num_attention_heads", None),
    "d_ff": ("intermediate_size", None), "max_len": ("max_position_embeddings", 2048),
    "norm_eps": ("rms_norm_eps", 1e-6), "tie_embeddings": ("tie_word_embeddings", False)}


def architectures(model_type: str) -> tuple[str, str, str]:
    """``(causal LM, backbone, sequence classification)`` architecture names of a model type."""
    p = _PREFIX[model_type]
    return f"{p}ForCausalLM", f"{p}Model", f"{p}ForSequenceClassification"


def is_reward(arch: str) -> bool:
    return arch.endswith("ForSequenceClassification")


def _rope_field(raw: Mapping) -> str:
    """The config field transformers reads rotary settings from: a non-empty ``rope_scaling``
    before ``rope_parameters`` (4.x knows only the first; 5.x takes it first), e.g. the YaRN
    block model cards say to add to config.json."""
    return "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"


def _rope(raw: Mapping, source: Path) -> tuple[float, tuple]:
    field = _rope_field(raw)
    rp = raw.get(field) or {}
    if not isinstance(rp, dict):
        raise CheckpointError(f"{source}: field {field!r} must be an object, got {rp!r}")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise CheckpointError(f"{source}: field '{field}.rope_type' = {rope_type!r} is not "
                              f"supported (only {_ROPE_TYPES}); refusing rather than computing "
                              "different positions")
    if rp.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: field 'partial_rotary_factor' is not supported (only 1)")
    theta = get_field(rp, "rope_theta", float, None, source) if "rope_theta" in rp else \
        get_field(raw, "rope_theta", float, 10000.0, source)
    if rope_type == "default":
        return float(theta), ()
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    vals = tuple(get_field(rp, k, int if k.startswith("original") else float, None,
                           Path(f"{source}: field '{field}'")) for k in keys)
    top = raw.get(keys[3])   # transformers 5 lets a top-level value override the block's; 4.x not
    if top is not None and top != vals[3]:
        raise CheckpointError(f"{source}: field '{keys[3]}' = {top!r} differs from "
                              f"'{field}.{keys[3]}' = {vals[3]!r}; transformers versions "
                              "disagree on which one counts")
    return float(theta), tuple(float(v) for v in vals[:3]) + (int(vals[3]),)


def config_from_hf(raw: Mapping, source: Path) -> tuple[LlamaConfig, str, tuple[str, ...]]:
    """``(LlamaConfig, architecture, scalar heads)`` of an HF Llama / Qwen2 / Qwen3 config."""
    model_type = raw["model_type"]
    lm, backbone, reward = architectures(model_type)
    archs = raw.get("architectures") or [lm]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in (lm, backbone, reward):
        raise CheckpointError(f"{source}: field 'architectures' = {archs!r}: supported "
                              f"{model_type} architectures are {[lm, backbone, reward]}")
    arch = archs[0]
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: field 'hidden_act' = {raw['hidden_act']!r} is not "
                              "supported (only 'silu', SwiGLU)")
    layer_types = raw.get("layer_types") or []
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise CheckpointError(f"{source}: field 'layer_types' = {layer_types!r}: expected a list "
                              "of layer type names")
    if get_field(raw, "use_sliding_window", bool, False, source) or any(
            t != "full_attention" for t in layer_types):
        raise CheckpointError(f"{source}: fields 'use_sliding_window' / 'layer_types': "
                              "sliding-window attention layers are not supported")
    if is_reward(arch) and raw.get("num_labels", len(raw.get("id2label") or {0: 0})) != 1:
        raise CheckpointError(f"{source}: field 'num_labels': a reward model has one output")
    for hf, default in FIELDS.values():
        if default is None and hf not in raw:
            raise CheckpointError(f"{source}: field {hf!r} is missing")
    kw = {ours: get_field(raw, hf, type(default) if default is not None else int, default,
                          source) for ours, (hf, default) in FIELDS.items()}
    kw["norm_eps"] = float(kw["norm_eps"])
    n_heads = kw["n_heads"]
    kw["n_kv_heads"] = get_field(raw, "num_key_value_heads", int, n_heads, source) \
        if raw.get("num_key_value_heads") is not None else n_heads
    if raw.get("head_dim") is not None:
        kw["head_dim"] = get_field(raw, "head_dim", int, None, source)
        if kw["head_dim"] < 1:   # (0 would mean hidden_size / num_attention_heads here)
            raise CheckpointError(f"{source}: field 'head_dim': must be > 0, got {kw['head_dim']}")
    elif model_type == "qwen3":   # transformers' Qwen3Config default, not hidden / heads
        kw["head_dim"] = 128
    kw["rope_theta"], kw["rope_llama3"] = _rope(raw, source)
    attention_bias = get_field(raw, "attention_bias", bool, False, source)
    kw.update(qkv_bias=True, o_bias=False) if model_type == "qwen2" else \
        kw.update(qkv_bias=attention_bias, o_bias=attention_bias)
    # only Llama's MLP reads mlp_bias; Qwen2's and Qwen3's have no biases whatever it says
    mlp_bias = get_field(raw, "mlp_bias", bool, False, source)
    kw["mlp_bias"] = mlp_bias and model_type == "llama"
    kw["qk_norm"] = model_type == "qwen3"
    try:
        cfg = LlamaConfig(**kw)
    except ConfigError as e:
        field, _, message = str(e).removeprefix("config field `").partition("`: ")
        names = {**{ours: hf for ours, (hf, _) in FIELDS.items()},
                 "n_kv_heads": "num_key_value_heads", "rope_llama3": _rope_field(raw)}
        raise CheckpointError(f"{source}: field {names.get(field, field)!r}: "
                              f"{hf_names(message, names)}") from None
    return cfg, arch, ("reward",) if is_reward(arch) else ()


def model_type_of(cfg: LlamaConfig) -> str:
    """The HF model type whose architecture computes ``cfg`` (for export without a source)."""
    if cfg.qk_norm:   # Qwen3: one attention_bias for q/k/v/o, an MLP without biases
        if cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias:
            raise ValueError(
                f"q/k norms with qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, "
                f"mlp_bias={cfg.mlp_bias}: Qwen3 (the architecture with q/k norms) has one "
                "attention_bias for q/k/v/o and no MLP biases; transformers would drop the others")
        return "qwen3"
    if cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias:
        return "qwen2"
    if cfg.qkv_bias != cfg.o_bias:
        raise ValueError("q/k/v and output biases differ, which no HF Llama-family "
                         "architecture expresses")
    return "llama"


def config_to_hf(cfg: LlamaConfig, arch: str, model_type: str, base: Mapping | None = None
                 ) -> dict:
    """An HF ``config.json`` for ``cfg`` as ``arch``; non-architecture fields of ``base`` kept."""
    out = {k: v for k, v in (base or {}).items()
           if k not in ("rope_scaling", "rope_theta", "rope_parameters")}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_llama3:
        rope.update(rope_type="llama3", **dict(zip(
            ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            cfg.rope_llama3)))
    out.update({"model_type": model_type, "architectures": [arch],
                **{hf: getattr(cfg, ours) for ours, (hf, _) in FIELDS.items()},
                "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
                "hidden_act": "silu", "attention_dropout": cfg.dropout,
                "mlp_bias": cfg.mlp_bias, "rope_parameters": rope,
                # older transformers read these two
                "rope_theta": cfg.rope_theta,
                "rope_scaling": None if not cfg.rope_llama3 else dict(rope)})
    if model_type != "qwen2":
        out["attention_bias"] = cfg.o_bias
    if is_reward(arch):
        out["num_labels"] = 1
        out.pop("id2label", None), out.pop("label2id", None)
    return out


def tensor_specs(cfg: LlamaConfig, arch: str) -> dict[str, TensorSpec]:
    """HF tensor name (without the ``model.`` prefix) -> where it goes in our tree."""
    d, f, v, k = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim
    specs = {"embed_tokens.weight": TensorSpec(("embed_tokens", "embedding"), (v, d)),
             "norm.weight": TensorSpec(("norm", "scale"), (d,))}
    proj = {"self_attn.q_proj": (d, cfg.n_heads * k, cfg.qkv_bias),
            "self_attn.k_proj": (d, cfg.n_kv_heads * k, cfg.qkv_bias),
            "self_attn.v_proj": (d, cfg.n_kv_heads * k, cfg.qkv_bias),
            "self_attn.o_proj": (cfg.n_heads * k, d, cfg.o_bias),
            "mlp.gate_proj": (d, f, cfg.mlp_bias), "mlp.up_proj": (d, f, cfg.mlp_bias),
            "mlp.down_proj": (f, d, cfg.mlp_bias)}
    for i in range(cfg.n_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            specs[f"layers.{i}.{norm}.weight"] = TensorSpec(("layers", i, norm, "scale"), (d,))
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                specs[f"layers.{i}.self_attn.{norm}.weight"] = TensorSpec(
                    ("layers", i, "self_attn", norm, "scale"), (k,))
        for mod, (n_in, n_out, bias) in proj.items():
            path = ("layers", i, *mod.split("."))
            specs[f"layers.{i}.{mod}.weight"] = TensorSpec((*path, "kernel"), (n_out, n_in),
                                                           transpose=True)
            if bias:
                specs[f"layers.{i}.{mod}.bias"] = TensorSpec((*path, "bias"), (n_out,))
    if arch.endswith("ForCausalLM") and not cfg.tie_embeddings:
        specs["lm_head.weight"] = TensorSpec(("lm_head",), (v, d))
    if is_reward(arch):
        specs["score.weight"] = TensorSpec(("heads", "reward", "kernel"), (1, d), transpose=True)
    return specs


def canonical_name(name: str) -> str | None:
    """A stored tensor name without the ``model.`` prefix; None for an allow-listed buffer."""
    if name.startswith("model."):
        name = name[len("model."):]
    return None if _BUFFER.match(name) else name


def stored_name(name: str) -> str:
    return name if name in ("lm_head.weight", "score.weight") else f"model.{name}"
