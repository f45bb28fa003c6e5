"""Models: GPT-2 (``GPT``) and Llama-family (``Llama``) decoders with scalar heads, their functional
wrapper, and Hugging Face import/export (``models.hf``)."""

from rlhf_jax.models.config import LLAMA_PRESETS, PRESETS, GPTConfig, LlamaConfig, preset
from rlhf_jax.models.decoder import KVCache, ModelOutput, init_cache
from rlhf_jax.models.functional import Model, ModelConfig, create_model
from rlhf_jax.models.gpt2 import GPT
from rlhf_jax.models.llama import Llama

__all__ = ["GPT", "GPTConfig", "KVCache", "LLAMA_PRESETS", "Llama", "LlamaConfig", "Model",
           "ModelConfig", "ModelOutput", "PRESETS", "create_model", "init_cache", "preset"]
