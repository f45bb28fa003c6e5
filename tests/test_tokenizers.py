"""Whether a prompt starts with a BOS: a checkpoint's ``tokenizer.json`` decides, as in
transformers (Llama's post-processor puts ``<|begin_of_text|>`` first; GPT-2's and Qwen's put
nothing), and a tokenizer built here writes its BOS into the ``tokenizer.json`` it exports."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tokenizers import processors

from rlhf_jax.data.batching import encode_prompts, pack_documents
from rlhf_jax.data.bpe import train_bpe, wrap
from rlhf_jax.data.task import Prompt
from rlhf_jax.data.tokenizers import HFTokenizer, TokenizerError, WordTokenizer, with_bos

TEXTS = ["the cat sat on the mat", "a dog ran to the park", "hello world"] * 4


def _byte_level(template: list[str] | None):
    """A byte-level BPE like Qwen's (``template=None``: a ByteLevel post-processor only) or
    Llama 3's (a ByteLevel post-processor, then a template putting these tokens first)."""
    tok = train_bpe(TEXTS, 300)
    pp = processors.ByteLevel(trim_offsets=False)
    if template:
        ids = [(t, tok.token_to_id(t)) for t in template]
        pp = processors.Sequence([pp, processors.TemplateProcessing(
            single=" ".join(template + ["$A"]), special_tokens=ids)])
    tok.post_processor = pp
    return tok


def _checkpoint(tmp_path, tok, config):
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return HFTokenizer.from_pretrained(tmp_path)


def _prompt_rows(tok, texts, length=12):
    ids, mask = encode_prompts(tok, [Prompt(str(i), t, True) for i, t in enumerate(texts)], length)
    return [list(r[m.astype(bool)]) for r, m in zip(ids, mask)]


def test_a_tokenizer_without_a_bos_template_gets_no_bos(tmp_path):
    """Qwen: config.json names a bos_token_id (<|endoftext|>) its tokenizer never adds; a BOS
    before every prompt was input the model never saw in training."""
    tok = _checkpoint(tmp_path, _byte_level(None), {"bos_token_id": 1, "eos_token_id": 2})
    assert not tok.add_bos
    texts = ["the cat", "hello world"]
    assert _prompt_rows(tok, texts) == [tok.encode(t) for t in texts]
    docs = pack_documents(tok, texts, 8)["tokens"].ravel()
    assert list(docs[:len(tok.encode(texts[0])) + 1]) == tok.encode(texts[0]) + [2]
    assert 1 not in docs
    assert _prompt_rows(tok, [""]) == [[1]]     # an empty prompt conditions on the BOS


def test_a_bos_template_sets_the_bos(tmp_path):
    """Llama 3: the post-processor puts <|begin_of_text|> first; it is the BOS even where
    config.json names none (else the BOS would fall back to EOS)."""
    tok = _checkpoint(tmp_path, _byte_level(["<bos>"]), {"eos_token_id": 2})
    assert (tok.add_bos, tok.bos_id) == (True, 1)
    assert _prompt_rows(tok, ["the cat"]) == [[1] + tok.encode("the cat")]
    assert tok.encode("the cat") == tok.hf_tokenizer().encode("the cat",
                                                              add_special_tokens=False).ids
    assert pack_documents(tok, ["the cat"], 8)["tokens"][0, 0] == 1


def test_a_prefix_of_two_special_tokens_is_refused(tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(
            f"{tmp_path / 'tokenizer.json'}: field 'post_processor' puts 2 special tokens")):
        _checkpoint(tmp_path, _byte_level(["<bos>", "<pad>"]), {"eos_token_id": 2})


@pytest.mark.parametrize("make", ["word", "bpe"])
def test_an_exported_tokenizer_says_that_prompts_start_with_bos(tmp_path, make):
    """The task tokenizers put <bos> before every prompt; their tokenizer.json carries it, so the
    re-imported tokenizer (and transformers' tokenizer(text)) starts prompts the same way."""
    ours = (WordTokenizer("the cat sat".split()) if make == "word"
            else wrap(train_bpe(TEXTS, 300)))
    hf = ours.hf_tokenizer()
    assert hf.encode("the cat").ids == [ours.bos_id] + ours.encode("the cat")
    back = _checkpoint(tmp_path, hf, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    assert (back.add_bos, back.bos_id) == (True, 1)
    texts = ["the cat", "the cat sat"]
    assert _prompt_rows(back, texts) == _prompt_rows(ours, texts)
    rows = _prompt_rows(ours, texts)
    assert rows == [with_bos(ours, ours.encode(t)) for t in texts]
    assert all(r[0] == 1 for r in rows)


def test_a_template_for_another_token_is_not_stacked(tmp_path):
    """Asking for a BOS template on a tokenizer whose post-processor already puts another token
    first is refused instead of writing two."""
    tok = _byte_level(["<pad>"])
    with pytest.raises(TokenizerError, match="puts id 0 first, not the BOS id 1"):
        HFTokenizer(tok, eos_ids=[2], bos_id=1)
    assert np.array_equal(HFTokenizer(tok, eos_ids=[2], bos_id=1, add_bos=False)
                          .hf_tokenizer().encode("hello").ids[:1], [0])


def test_an_export_keeps_the_checkpoint_s_tokenizer_config(tmp_path):
    """An imported checkpoint's tokenizer_config.json (its chat template, its tokenizer class)
    is written back by an export; a tokenizer built here gets one naming its special tokens, and
    decoding skips them."""
    import jax

    from rlhf_jax.models import create_model, preset
    from rlhf_jax.models.hf import save_pretrained

    model, params = create_model(preset("test"), jax.random.key(0))
    words = WordTokenizer("the cat sat".split())
    save_pretrained(tmp_path / "a", model, params, tokenizer=words)
    written = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert written == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
                       "eos_token": "<eos>", "pad_token": "<pad>"}
    back = HFTokenizer.from_pretrained(tmp_path / "a")
    assert back.decode([1, *back.encode("the cat"), 2, 0]) == "the cat"
    own = {**written, "chat_template": "{{ messages[0]['content'] }}", "model_max_length": 48}
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(own))
    save_pretrained(tmp_path / "b", model, params,
                    tokenizer=HFTokenizer.from_pretrained(tmp_path / "a"))
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text()) == own
    # transformers >= 4.43 saves the chat template beside it, as chat_template.jinja
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(written))
    (tmp_path / "a" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    save_pretrained(tmp_path / "c", model, params,
                    tokenizer=HFTokenizer.from_pretrained(tmp_path / "a"))
    assert json.loads((tmp_path / "c" / "tokenizer_config.json").read_text()) == {
        **written, "chat_template": "{{ messages[0]['content'] }}"}
    (tmp_path / "a" / "tokenizer_config.json").unlink()   # a template and no config at all
    save_pretrained(tmp_path / "d", model, params,
                    tokenizer=HFTokenizer.from_pretrained(tmp_path / "a"))
    assert json.loads((tmp_path / "d" / "tokenizer_config.json").read_text()) == {
        **written, "chat_template": "{{ messages[0]['content'] }}"}
    (tmp_path / "a" / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(TokenizerError, match=re.escape(
            f"{tmp_path / 'a' / 'tokenizer_config.json'}: expected a JSON object, got list")):
        HFTokenizer.from_pretrained(tmp_path / "a")
