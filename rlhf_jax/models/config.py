"""Transformer configs: frozen dataclasses for GPT-2 and the Llama family, and named presets."""

from __future__ import annotations

import dataclasses
from typing import Literal

from rlhf_jax.configs import check, in_unit_interval, positive
from rlhf_jax.precision import compute_dtype

Precision = Literal["float32", "bf16"]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """GPT-2 architecture hyperparameters (names follow HF ``GPT2Config`` where they overlap).

    Attributes:
      vocab_size: number of token ids (tied input/output embedding rows).
      max_len: context length = number of learned positions (HF ``n_positions``).
      d_model: residual width (HF ``n_embd``).
      n_layers: transformer blocks (HF ``n_layer``).
      n_heads: attention heads; ``d_model`` must divide by it.
      d_ff: MLP hidden width; 0 means ``4 * d_model`` as in GPT-2.
      dropout: residual/attention dropout; 0 by default so sampler and trainer log-probs agree.
      ln_eps: LayerNorm epsilon (GPT-2: 1e-5).
      tie_embeddings: the output layer is the token embedding (GPT-2); False adds a separate
        output matrix ``lm_head [V, D]`` (HF ``tie_word_embeddings: false``).
      precision: ``"float32"`` (default) or ``"bf16"``: matmul inputs in bfloat16 with float32
        accumulation; parameters, norms, softmax, logits and heads stay float32
        (:mod:`rlhf_jax.precision`).
    """

    vocab_size: int = 50257
    max_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 0
    dropout: float = 0.0
    ln_eps: float = 1e-5
    tie_embeddings: bool = True
    precision: Precision = "float32"

    def __post_init__(self):
        positive(self, "vocab_size", "max_len", "d_model", "n_layers", "n_heads")
        check(self.d_ff >= 0, "d_ff", f"must be >= 0 (0 = 4*d_model), got {self.d_ff}")
        check(self.d_model % self.n_heads == 0, "n_heads",
              f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        in_unit_interval(self, "dropout", closed=False)
        check(self.ln_eps > 0, "ln_eps", f"must be > 0, got {self.ln_eps}")
        compute_dtype(self.precision)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def matmul_dtype(self):
        """Matmul input dtype: None (float32 throughout) or bfloat16."""
        return compute_dtype(self.precision)

    @property
    def kv_heads(self) -> int:   # every head has its own keys and values
        return self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    def replace(self, **kw) -> "GPTConfig":
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, GPTConfig] = {
    # unit tests: compiles in well under a second
    "test": GPTConfig(vocab_size=64, max_len=64, d_model=32, n_layers=2, n_heads=2),
    # the embedded default task (vocab is replaced by the task tokenizer's size)
    "task": GPTConfig(vocab_size=600, max_len=64, d_model=128, n_layers=2, n_heads=4),
    # the side-by-side benchmark against TRL (../shared/bench): 3.36M parameters
    "bench": GPTConfig(vocab_size=512, max_len=256, d_model=256, n_layers=4, n_heads=4),
    "gpt2": GPTConfig(),  # GPT-2 small, 124M
    "gpt2-medium": GPTConfig(d_model=1024, n_layers=24, n_heads=16),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama-family hyperparameters (Llama 3, Qwen2/2.5, Qwen3, SmolLM2); names follow
    :class:`GPTConfig` where they overlap, HF fields in parentheses.

    Attributes:
      vocab_size: token ids (``vocab_size``).
      max_len: longest supported position (``max_position_embeddings``).
      d_model: residual width (``hidden_size``).
      n_layers: decoder layers (``num_hidden_layers``).
      n_heads: query heads (``num_attention_heads``).
      n_kv_heads: key/value heads (``num_key_value_heads``); query head h uses KV head
        ``h // (n_heads // n_kv_heads)`` (grouped-query attention).
      head_dim: width of one head; 0 means ``d_model // n_heads`` (Qwen3 sets its own).
      d_ff: SwiGLU hidden width (``intermediate_size``).
      norm_eps: RMSNorm epsilon (``rms_norm_eps``).
      rope_theta: rotary base (``rope_theta``).
      rope_llama3: Llama 3.1/3.2 rotary scaling ``(factor, low_freq_factor, high_freq_factor,
        original_max_position_embeddings)``, or empty for unscaled ("default") rotary positions.
      tie_embeddings: the output layer is the token embedding (``tie_word_embeddings``).
      qkv_bias: q/k/v projections have biases (Qwen2; Llama's ``attention_bias``).
      o_bias: the output projection has a bias (Llama's ``attention_bias``).
      mlp_bias: the MLP projections have biases (Llama's ``mlp_bias``).
      qk_norm: per-head RMSNorm on queries and keys before the rotation (Qwen3).
      dropout: attention-probability dropout (``attention_dropout``); 0 so sampler and trainer
        log-probs agree.
      precision: ``"float32"`` (default) or ``"bf16"``: matmul inputs in bfloat16 with float32
        accumulation; parameters, norms, softmax, logits and heads stay float32
        (:mod:`rlhf_jax.precision`).
    """

    vocab_size: int = 49152
    max_len: int = 2048
    d_model: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 0
    d_ff: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_llama3: tuple[float, float, float, int] | tuple[()] = ()
    tie_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    dropout: float = 0.0
    precision: Precision = "float32"

    def __post_init__(self):
        positive(self, "vocab_size", "max_len", "d_model", "n_layers", "n_heads", "n_kv_heads",
                 "d_ff")
        check(self.head_dim >= 0, "head_dim", f"must be >= 0 (0 = d_model // n_heads), got "
              f"{self.head_dim}")
        if self.head_dim == 0:
            check(self.d_model % self.n_heads == 0, "n_heads",
                  f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                  "set head_dim")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
              f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        check(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        check(len(self.rope_llama3) in (0, 4), "rope_llama3",
              "(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) "
              f"or empty, got {self.rope_llama3!r}")
        if self.rope_llama3:
            factor, low, high, orig = self.rope_llama3
            check(factor > 0 and orig > 0 and high > low > 0, "rope_llama3",
                  f"needs factor > 0, high_freq_factor > low_freq_factor > 0 and original "
                  f"positions > 0, got {self.rope_llama3!r}")
        in_unit_interval(self, "dropout", closed=False)
        compute_dtype(self.precision)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff

    @property
    def matmul_dtype(self):
        """Matmul input dtype: None (float32 throughout) or bfloat16."""
        return compute_dtype(self.precision)

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    # unit tests: grouped-query attention 4:2, untied output
    "llama-test": LlamaConfig(vocab_size=64, max_len=64, d_model=32, n_layers=2, n_heads=4,
                              n_kv_heads=2, d_ff=48, tie_embeddings=False),
    # the shapes of published checkpoints (random weights; for scale measurements)
    "smollm2-135m": LlamaConfig(vocab_size=49152, max_len=8192, d_model=576, n_layers=30,
                                n_heads=9, n_kv_heads=3, d_ff=1536, rope_theta=100000.0),
    "qwen2.5-0.5b": LlamaConfig(vocab_size=151936, max_len=32768, d_model=896, n_layers=24,
                                n_heads=14, n_kv_heads=2, d_ff=4864, norm_eps=1e-6,
                                rope_theta=1000000.0, qkv_bias=True),
}


def preset(name: str, **overrides) -> GPTConfig | LlamaConfig:
    """A named preset, optionally with fields replaced (``preset('task', vocab_size=181)``)."""
    presets = {**PRESETS, **LLAMA_PRESETS}
    if name not in presets:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
    return presets[name].replace(**overrides)
