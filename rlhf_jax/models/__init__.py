"""Models: a GPT-2-compatible decoder (``GPT``) with scalar heads, and its functional wrapper."""

from rlhf_jax.models.config import PRESETS, GPTConfig, preset
from rlhf_jax.models.functional import Model, create_model
from rlhf_jax.models.gpt2 import GPT, KVCache, ModelOutput, init_cache

__all__ = ["GPT", "GPTConfig", "KVCache", "Model", "ModelOutput", "PRESETS", "create_model",
           "init_cache", "preset"]
