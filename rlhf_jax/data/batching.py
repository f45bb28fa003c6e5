"""Turning token lists into fixed-shape arrays, and a stateless, resumable batch order.

Shapes are fixed per dataset (prompts left-padded to one length, responses right-padded to one
length) so each jitted function compiles once. :class:`EpochOrder` gives the example indices of any
step as a pure function of ``(seed, step)``: a run resumed at step ``s`` sees exactly the batches an
uninterrupted run would, with nothing repeated or skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlhf_jax.data.bpe import RoundTripTokenizer
from rlhf_jax.data.task import Prompt
from rlhf_jax.data.tokenizers import Tokenizer, response_ids, with_bos


def pad_left(seqs: Sequence[Sequence[int]], length: int, pad_id: int, *, what: str = "sequence"
             ) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad to ``[N, length]``; returns ``(ids int32, mask int32)``. Too long -> ValueError."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"{what} {i} has {len(s)} tokens, more than the allowed {length}")
        if len(s):
            ids[i, length - len(s):] = s
            mask[i, length - len(s):] = 1
    return ids, mask


def pad_right(seqs: Sequence[Sequence[int]], length: int, pad_id: int, *, what: str = "sequence"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to ``[N, length]``; returns ``(ids int32, mask int32)``. Too long -> ValueError."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"{what} {i} has {len(s)} tokens, more than the allowed {length}")
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def encode_prompts(tok: Tokenizer, prompts: Sequence[Prompt], length: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``with_bos(encode(text))`` (a BOS first when the tokenizer adds one), left-padded to
    ``length``."""
    return pad_left([with_bos(tok, tok.encode(p.text)) for p in prompts], length, tok.pad_id,
                    what="prompt")


def response_tokens(tok: Tokenizer, text: str, ids: Sequence[int] | None) -> list[int]:
    """A stored response's tokens: its sampled ``ids`` when they are ids of ``tok`` that decode
    to ``text`` exactly (and hold no EOS), else ``tok.encode(text)`` (no ids
    stored, or ids of another tokenizer).

    Checking leaves a :class:`~rlhf_jax.data.bpe.RoundTripTokenizer`'s memory as it was."""
    if (ids is not None and all(0 <= i < tok.vocab_size for i in ids)
            and response_ids(tok, ids) == list(ids)):
        quiet = {"remember": False} if isinstance(tok, RoundTripTokenizer) else {}
        if tok.decode(ids, **quiet) == text:
            return list(ids)
    return tok.encode(text)


def encode_responses(tok: Tokenizer, responses: Sequence[str], length: int, *,
                     widen: bool = False, cut: bool = False,
                     ids: Sequence[Sequence[int] | None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``encode(text) + [eos]``, right-padded to ``length`` (``widen``: to the longest row when
    that is more, instead of an error; ``cut``: a response of more than ``length - 1`` tokens keeps
    its first ``length - 1``, then EOS). ``ids``: each response's stored sampled ids or ``None``,
    used in place of ``encode`` where valid (:func:`response_tokens`). ``cut`` serves
    recomputations on a sampling budget of ``length - 1`` tokens: sampled ids always fit it, but a
    record stored before its ids is read as its text's canonical encoding, which can outgrow it."""
    ids = [None] * len(responses) if ids is None else ids
    keep = length - 1 if cut else None
    rows = [response_tokens(tok, r, i)[:keep] + [tok.eos_id]
            for r, i in zip(responses, ids, strict=True)]
    if widen:
        length = max([length, *map(len, rows)])
    return pad_right(rows, length, tok.pad_id, what="response")


def encode_groups(tok: Tokenizer, prompts: Sequence[Prompt], responses: Sequence[Sequence[str]],
                  *, prompt_len: int, response_len: int, widen: bool = False, cut: bool = False,
                  ids: Sequence[Sequence[Sequence[int]] | None] | None = None
                  ) -> dict[str, np.ndarray]:
    """K responses per prompt (``responses[i][j]`` answers ``prompts[i]``, K equal for all):
    ``prompts [N, Lp]`` / ``prompt_mask`` left-padded, ``responses [N, K, Lr]`` /
    ``response_mask`` right-padded with EOS. ``ids[i]``: the K responses' stored sampled ids, or
    ``None``; ``widen`` / ``cut``: see :func:`encode_responses`."""
    n, k = len(responses), len(responses[0]) if responses else 0
    p_ids, p_mask = encode_prompts(tok, prompts, prompt_len)
    flat_ids = None if ids is None else [i for row, r in zip(ids, responses, strict=True)
                                         for i in (row if row is not None else [None] * len(r))]
    r_ids, r_mask = encode_responses(tok, [r for row in responses for r in row], response_len,
                                     widen=widen, cut=cut, ids=flat_ids)
    return {"prompts": p_ids, "prompt_mask": p_mask,
            "responses": r_ids.reshape(n, k, -1), "response_mask": r_mask.reshape(n, k, -1)}


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with its last row repeated up to ``rows`` rows (fills a fixed-shape final batch)."""
    if len(a) >= rows:
        return a
    return np.concatenate([a, np.repeat(a[-1:], rows - len(a), axis=0)])


def pack_documents(tok: Tokenizer, docs: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
    """Pretraining batches: ``[bos] doc [eos]`` (no BOS when the tokenizer adds none, e.g.
    GPT-2's or Qwen's) concatenated and cut into ``[N, seq_len]`` rows."""
    bos = [tok.bos_id] if getattr(tok, "add_bos", True) else []
    stream = np.concatenate([np.asarray(bos + tok.encode(d) + [tok.eos_id], np.int32)
                             for d in docs])
    n = int(np.ceil(len(stream) / seq_len))
    tokens = np.full(n * seq_len, tok.pad_id, np.int32)
    tokens[:len(stream)] = stream
    mask = np.zeros(n * seq_len, np.int32)
    mask[:len(stream)] = 1
    tokens, mask = tokens.reshape(n, seq_len), mask.reshape(n, seq_len)
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": mask}


def sft_examples(tok: Tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], *,
                 prompt_len: int, response_len: int) -> dict[str, np.ndarray]:
    """SFT rows ``[prompt | response]`` with the loss on response tokens (EOS included)."""
    return sft_rows(*encode_prompts(tok, prompts, prompt_len),
                    *encode_responses(tok, responses, response_len))


def sft_rows(p_ids: np.ndarray, p_mask: np.ndarray, r_ids: np.ndarray, r_mask: np.ndarray
             ) -> dict[str, np.ndarray]:
    """SFT rows ``[prompt | response]`` of left-padded prompts and right-padded responses, the
    loss on the response tokens."""
    return {"tokens": np.concatenate([p_ids, r_ids], 1),
            "attention_mask": np.concatenate([p_mask, r_mask], 1),
            "loss_mask": np.concatenate([np.zeros_like(p_mask), r_mask], 1)}


@dataclasses.dataclass(frozen=True)
class EpochOrder:
    """Example indices for each step: epochs of seeded permutations, read in consecutive slices.

    ``indices(step)`` depends only on ``(n, batch_size, seed, step)``, so it needs no iterator
    state to checkpoint.
    """

    n: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.n <= 0:
            raise ValueError("EpochOrder needs at least one example")

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def indices(self, step: int) -> np.ndarray:
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = flat // self.n
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[flat[sel] % self.n]
        return out

    def batch(self, data: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        return {k: v[idx] for k, v in data.items()}


TOKEN_FIELDS = ("tokens", "prompts", "responses", "input_ids")
MASK_FIELDS = ("attention_mask", "loss_mask", "prompt_mask", "response_mask", "mask")


def check_tokens(data: dict[str, np.ndarray], *, vocab_size: int, source: str) -> None:
    """Refuse token ids outside ``[0, vocab_size)`` and masks that are not 0/1 (a model would
    otherwise clamp them silently inside jit), naming the source, field, row and position."""
    for name, a in data.items():
        a = np.asarray(a)
        if name in TOKEN_FIELDS:
            bad = np.argwhere((a < 0) | (a >= vocab_size))
            if len(bad):
                at = tuple(int(i) for i in bad[0])
                raise ValueError(f"{source}: field {name!r} row {at[0]} position "
                                 f"{', '.join(map(str, at[1:]))} holds token {a[at]}, outside "
                                 f"the vocabulary [0, {vocab_size})")
        elif name in MASK_FIELDS:
            bad = np.argwhere((a != 0) & (a != 1))
            if len(bad):
                raise ValueError(f"{source}: field {name!r} row {int(bad[0][0])} is not a 0/1 "
                                 f"mask (holds {a[tuple(bad[0])]})")
