"""A byte-level BPE tokenizer trained from scratch on a task's texts (HF ``tokenizers``), cached.

GPT-2's 50,257-row output layer would cost most of a small model's FLOPs on a CPU; a BPE of ~8k
merges trained on the task's own training texts keeps the output layer small. Ids 0, 1, 2 are
``<pad> <bos> <eos>``. Training is deterministic (same texts and size ⇒ the same
``tokenizer.json``, byte for byte), and its result is cached as
``<cache_dir>/bpe_<vocab>_<sha256 of the texts>.json``, so every stage of a pipeline (and every
seed) reads the same file.

Sampled token sequences need not be BPE's canonical segmentation of their text (an undertrained
model writes "Ġa" "nd" as readily as "Ġand", or half of a multi-byte character), so decoding and
encoding again can change the tokens, and even their number. The stages pass responses as text
(preference records, evaluation records), so :class:`RoundTripTokenizer` remembers the ids of the
texts it decoded: encoding such a text again gives back exactly the sampled tokens, and the reward
model and the KL see what the policy wrote. Other texts get the canonical encoding. That memory
ends with the process; so preference records also store each response's sampled ids
(``response_ids``), which the stages use whenever they decode to the stored text
(:func:`rlhf_jax.data.batching.response_tokens`): a stage resumed in a new process trains on the
same tokens as one run straight through.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from rlhf_jax.data.tokenizers import HFTokenizer, response_ids

SPECIALS = ("<pad>", "<bos>", "<eos>")


def train_bpe(texts: Sequence[str], vocab_size: int):
    """An HF ``tokenizers.Tokenizer``: byte-level BPE with :data:`SPECIALS` as ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()


class RoundTripTokenizer(HFTokenizer):
    """An :class:`HFTokenizer` whose ``encode`` of a text it decoded returns the decoded ids (the
    last ``memo_size`` texts; when two id sequences decode to one text, the later one's). The
    ids remembered are :func:`~rlhf_jax.data.tokenizers.response_ids`: every id before EOS."""

    def __init__(self, tok, *, memo_size: int = 1 << 18, **kw):
        super().__init__(tok, **kw)
        self.memo_size = memo_size
        self._memo: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def decode(self, ids: Sequence[int], *, remember: bool = True) -> str:
        """The text of ``ids`` (its :func:`response_ids`); ``remember=False`` leaves the memory
        of decoded texts as it was."""
        kept = response_ids(self, ids)
        text = super().decode(kept)
        if remember:
            self._memo[text] = tuple(kept)
            self._memo.move_to_end(text)
            if len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        return text

    def encode(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        return list(ids) if ids is not None else super().encode(text)


def wrap(tok) -> RoundTripTokenizer:
    """The library's tokenizer interface over a :func:`train_bpe` result (EOS ends decoding)."""
    ids = [tok.token_to_id(s) for s in SPECIALS]
    if ids != [0, 1, 2]:
        raise ValueError(f"a task BPE needs {SPECIALS} as ids 0-2, found ids {ids}")
    return RoundTripTokenizer(tok, eos_ids=[2], pad_id=0, bos_id=1)


_LOADED: dict[Path, RoundTripTokenizer] = {}


def cached_bpe(texts: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike
               ) -> RoundTripTokenizer:
    """The BPE of ``texts`` (trained once, then read from ``cache_dir``); one instance per file
    in a process, so every stage's task shares its memory of decoded texts."""
    from tokenizers import Tokenizer

    path = (Path(cache_dir) / f"bpe_{vocab_size}_{texts_digest(texts)[:16]}.json").resolve()
    if path in _LOADED:
        return _LOADED[path]
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = train_bpe(texts, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(tok.to_str())
        os.replace(tmp, path)     # atomic: a concurrent reader sees the whole file or none
    return _LOADED.setdefault(path, wrap(tok))
