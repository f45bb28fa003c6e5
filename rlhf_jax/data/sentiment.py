"""A real-text task: continue a fortune so the continuation is positive (Ziegler et al. 2019, §4.1).

* **Texts.** Debian's ``fortunes`` (``apt-get install fortunes``), read by the TFDS builder
  :class:`rlhf_jax.data.fortunes.Fortunes` (attribution stripped, non-prose dropped,
  de-duplicated, split by a hash of the text). The pretraining corpus is the ``train`` split.
* **Tokenizer.** A byte-level BPE of ``vocab_size`` (≈ 8k) trained on the ``train`` split and
  cached in ``data_dir`` (:mod:`rlhf_jax.data.bpe`), or an imported checkpoint's own.
* **Prompts.** Every text of at least ``min_text_tokens`` (24) tokens gives one prompt: its first
  8–16 tokens (the count fixed by the text's hash), decoded; ``heldout`` prompts come from
  ``heldout`` texts only (the first ``heldout_prompts`` by hash). Responses: at most the task's
  ``max_new_tokens`` (24), sampled at T = 1 without top-k / top-p.
* **No demonstrations.** As in Ziegler et al. the starting policy is the pretrained LM (the SFT
  stage runs with ``steps = 0``; it is still named ``sft`` in summaries).
* **The hidden gold judge.** VADER's compound sentiment (Hutto & Gilbert 2014; the
  ``vaderSentiment`` package and its shipped lexicon, offline) of the continuation only, in
  [−1, 1]; labels ``positive`` (≥ 0.05), ``negative`` (≤ −0.05), ``neutral``. The simulated
  labeller (:mod:`rlhf_jax.labeler`) ranks K samples with Plackett–Luce noise of temperature τ,
  so P(a ≻ b) = σ((c_a − c_b)/τ) and equal scores (often compound 0) are coin flips.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from rlhf_jax.configs import check
from rlhf_jax.data.bpe import cached_bpe
from rlhf_jax.data.fortunes import DEFAULT_DIR, load_fortunes
from rlhf_jax.data.task import Judgement, Prompt, Task, check_lengths
from rlhf_jax.data.tokenizers import Tokenizer

POSITIVE, NEGATIVE = 0.05, -0.05    # VADER's own thresholds for a positive / negative text


def default_data_dir() -> str:
    """``$RLHF_JAX_DATA/sentiment``, else ``~/.cache/rlhf_jax/sentiment``."""
    root = os.environ.get("RLHF_JAX_DATA") or os.path.join(Path.home(), ".cache", "rlhf_jax")
    return os.path.join(root, "sentiment")


@dataclasses.dataclass(frozen=True)
class SentimentConfig:
    """Attributes:
      fortunes_dir: the directory of fortune files (manual data of the TFDS builder).
      data_dir: where the TFDS data set and the BPE are built and cached ("" = the default
        :func:`default_data_dir`).
      vocab_size: BPE vocabulary (specials included).
      heldout_every: a text is held out when its hash is 0 modulo this (≈ 1/heldout_every).
      min_text_tokens: only texts at least this long (tokens) give prompts.
      min_prompt_tokens, max_prompt_tokens: a prompt is the first 8–16 tokens of its text.
      heldout_prompts: evaluation prompts (the first by hash of the held-out ones; 0 = all).
      train_prompts: prompts for preferences and RL (the first by hash of the train ones; 0 =
        all, 5,925 with the installed fortunes); the pretraining corpus is every train text
        either way.
    """

    fortunes_dir: str = DEFAULT_DIR
    data_dir: str = ""
    vocab_size: int = 8192
    heldout_every: int = 10
    min_text_tokens: int = 24
    min_prompt_tokens: int = 8
    max_prompt_tokens: int = 16
    heldout_prompts: int = 256
    train_prompts: int = 0

    def __post_init__(self):
        check(self.vocab_size >= 260, "vocab_size", "a byte-level BPE needs >= 260 ids")
        check(self.heldout_every >= 2, "heldout_every", "must be >= 2")
        check(0 < self.min_prompt_tokens <= self.max_prompt_tokens, "max_prompt_tokens",
              f"need 0 < min_prompt_tokens <= max_prompt_tokens, got {self.min_prompt_tokens}, "
              f"{self.max_prompt_tokens}")
        check(self.min_text_tokens > self.max_prompt_tokens, "min_text_tokens",
              "must exceed max_prompt_tokens (a prompt leaves some of its text)")
        check(self.heldout_prompts >= 0, "heldout_prompts", "must be >= 0")
        check(self.train_prompts >= 0, "train_prompts", "must be >= 0")


@functools.lru_cache(maxsize=4)
def _texts(fortunes_dir: str, data_dir: str, heldout_every: int) -> dict[str, tuple[str, ...]]:
    return {s: tuple(t) for s, t in load_fortunes(fortunes_dir, Path(data_dir) / "tfds",
                                                  heldout_every=heldout_every).items()}


@functools.lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def compound(text: str) -> float:
    """VADER's compound sentiment of ``text``, in [−1, 1] (0 for an empty text)."""
    return float(_analyzer().polarity_scores(text)["compound"]) if text.strip() else 0.0


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


class SentimentTask(Task):
    """Positive continuations of fortunes (module docstring). Deterministic given its config and
    the fortune files."""

    name = "sentiment"
    top_score = 1.0
    headline = ("gold", "positive_rate")
    reported = ("negative_rate",)
    kinds = ("positive", "neutral", "negative")
    demonstrations = False

    def __init__(self, cfg: SentimentConfig = SentimentConfig(), *,
                 tokenizer: Tokenizer | None = None):
        self.cfg = cfg
        data_dir = cfg.data_dir or default_data_dir()
        self.texts = _texts(str(cfg.fortunes_dir), str(data_dir), cfg.heldout_every)
        self.tokenizer = tokenizer if tokenizer is not None else cached_bpe(
            self.texts["train"], cfg.vocab_size, Path(data_dir) / "bpe")

    def pretraining_corpus(self) -> list[str]:
        return list(self.texts["train"])

    @functools.lru_cache(maxsize=None)
    def _prompts(self, split: str) -> tuple[Prompt, ...]:
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'heldout'")
        cfg, tok = self.cfg, self.tokenizer
        texts = sorted(self.texts[split], key=_hash)     # a fixed order, independent of files
        out = []
        span = cfg.max_prompt_tokens - cfg.min_prompt_tokens + 1
        for text in texts:
            ids = tok.encode(text)
            if len(ids) < cfg.min_text_tokens:
                continue
            h = _hash(text)
            prompt = tok.decode(ids[:cfg.min_prompt_tokens + h % span])
            if not prompt.strip() or len(tok.encode(prompt)) > cfg.max_prompt_tokens:
                continue   # a cut inside a multi-byte character or a word re-encoded longer
            out.append(Prompt(f"{split}/{h:016x}", prompt, True, {"text": text}))
            if len(out) == (cfg.heldout_prompts if split == "heldout" else cfg.train_prompts):
                break
        if not out:
            raise ValueError(f"sentiment: no {split} text has {cfg.min_text_tokens} tokens or "
                             f"more in {cfg.fortunes_dir}")
        return tuple(out)

    def prompts(self, split: str) -> list[Prompt]:
        return list(self._prompts(split))

    def demonstration(self, prompt: Prompt, rng: np.random.Generator) -> str:
        raise NotImplementedError(
            "the sentiment task has no demonstrations: its starting policy is the pretrained "
            "model (run SFT with --sft.steps 0)")

    def judge(self, prompt: Prompt, response: str) -> Judgement:
        """VADER compound of the continuation alone (the prompt is not judged)."""
        c = compound(response)
        label = "positive" if c >= POSITIVE else "negative" if c <= NEGATIVE else "neutral"
        return Judgement(c, label)

    def summarize(self, prompts: Sequence[Prompt], judgements: Sequence[Judgement]
                  ) -> dict[str, float]:
        """``gold`` (mean compound), ``top_rate``, ``positive_rate``, ``negative_rate``."""
        check_lengths(prompts, judgements)
        n = max(len(judgements), 1)
        return {**super().summarize(prompts, judgements),
                "positive_rate": sum(j.label == "positive" for j in judgements) / n,
                "negative_rate": sum(j.label == "negative" for j in judgements) / n}
