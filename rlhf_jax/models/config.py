"""Transformer config: one frozen dataclass and named presets from a test size to GPT-2 small."""

from __future__ import annotations

import dataclasses

from rlhf_jax.configs import check, in_unit_interval, positive


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

    def __post_init__(self):
        positive(self, "vocab_size", "max_len", "d_model", "n_layers", "n_heads")
        check(self.d_ff >= 0, "d_ff", f"must be >= 0 (0 = 4*d_model), got {self.d_ff}")
        check(self.d_model % self.n_heads == 0, "n_heads",
              f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        in_unit_interval(self, "dropout", closed=False)
        check(self.ln_eps > 0, "ln_eps", f"must be > 0, got {self.ln_eps}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

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


def preset(name: str, **overrides) -> GPTConfig:
    """A named preset, optionally with fields replaced (``preset('task', vocab_size=181)``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
