"""Stored sampled ids (``response_ids`` of a preference record): the arrays the RM and DPO train
on are the ids the policy sampled, in this process or a new one, on the sentiment task's BPE
(tests/fixtures/fortunes), where a sampled text's canonical encoding can differ from its ids."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tokenizers import Tokenizer

from rlhf_jax.data import bpe
from rlhf_jax.data.batching import response_tokens
from rlhf_jax.data.sentiment import SentimentConfig, SentimentTask
from rlhf_jax.data.tokenizers import response_ids
from rlhf_jax.labeler import Preferences
from rlhf_jax.stages.reward import preference_arrays, read_preferences, store_and_reload
from rlhf_jax.tasks import TaskConfig

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "fortunes"
WORD = " wonderful"

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return SentimentTask(SentimentConfig(fortunes_dir=str(FIXTURE), vocab_size=320,
                                         data_dir=str(tmp_path_factory.mktemp("sentiment")),
                                         heldout_every=5))


def fresh(tok) -> bpe.RoundTripTokenizer:
    """The same BPE with no memory of decoded texts: what a new process has."""
    return bpe.wrap(Tokenizer.from_str(tok.to_json()))


def spelled(tok, text: str) -> list[int]:
    """A non-canonical spelling of ``text``: one BPE piece per character."""
    return [i for ch in text for i in tok.encode(ch)]


def test_response_ids_are_every_sampled_id_before_eos(task):
    """A padding or BOS id the policy sampled stays (what is scored later is what was sampled);
    the padding after EOS goes."""
    tok = task.tokenizer
    row = [40, tok.pad_id, 41, tok.bos_id, tok.eos_id, 42, tok.pad_id]
    assert response_ids(tok, row) == [40, tok.pad_id, 41, tok.bos_id]
    assert response_ids(tok, [tok.eos_id, 40]) == [] and response_ids(tok, [40]) == [40]


def test_stored_ids_give_the_sampled_tokens_in_a_new_process(task, tmp_path):
    """Sampled rows (EOS, padding) decoded as the sampler does, stored, read back, and turned into
    arrays by a tokenizer without memory: each response is exactly its sampled ids, also where
    its text's canonical encoding differs (a spelled-out word; lead bytes of multi-byte characters,
    whose text re-encodes longer; the same text sampled twice as different ids)."""
    tok = task.tokenizer
    canonical = tok.encode(WORD)
    euro = tok.encode("\u20ac")                    # 3 byte-level pieces
    half = canonical[:1] + euro[:1] * 4            # lead bytes alone: 4 replacement characters
    sampled = [[spelled(tok, WORD), canonical],    # one text, two spellings
               [half, tok.encode(" the day")]]
    assert len(euro) == 3 and tok.decode(half, remember=False).endswith("\ufffd" * 4)
    pad, eos = tok.pad_id, tok.eos_id
    rows = [[ids + [eos] + [pad] * 3 for ids in group] for group in sampled]
    texts = [[tok.decode(r) for r in group] for group in rows]         # as generate() does
    ids = [[response_ids(tok, r) for r in group] for group in rows]
    assert ids == sampled
    new = fresh(tok)
    assert new.encode(texts[0][0]) != sampled[0][0]                    # canonical differs
    assert len(new.encode(texts[1][0])) > 10                          # past the budget

    prompts = task.prompts("train")[:2]
    prefs = Preferences(prompts, texts, np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),
                        np.zeros((2, 2), np.float32), [["x", "x"]] * 2, ids)
    stored = store_and_reload({"train": prefs}, tmp_path / "data", task)["train"]
    assert stored.response_ids == sampled and stored.responses == texts
    shapes = TaskConfig(prompt_len=24, max_new_tokens=10)
    got = preference_arrays(new, stored, shapes, max_len=64)
    assert got["responses"].shape == (2, 2, 11)                       # the budget's width
    for i, j in np.ndindex(2, 2):
        n = len(sampled[i][j])
        np.testing.assert_array_equal(got["responses"][i, j, :n + 1], sampled[i][j] + [eos])
        np.testing.assert_array_equal(got["response_mask"][i, j], np.arange(11) < n + 1)
    # the process that sampled them gets the same arrays, whatever its memory holds
    same = preference_arrays(tok, read_preferences(tmp_path / "data", "train", task), shapes,
                             max_len=64)
    for k in got:
        np.testing.assert_array_equal(same[k], got[k])
    # without the ids (a data set stored before them), the text is encoded: canonical ids
    old = preference_arrays(new, dataclasses.replace(stored, response_ids=None), shapes,
                            max_len=64)
    want = new.encode(texts[0][0]) + [eos]
    np.testing.assert_array_equal(old["responses"][0, 0, :len(want)], want)
    assert old["responses"].shape[-1] > 11                             # widened for the "\ufffd"s


def test_ids_that_do_not_decode_to_the_text_are_ignored(task):
    """Ids of another text, another tokenizer's (past the vocabulary) or holding EOS give the
    text's encoding; checking leaves the tokenizer's memory as it was."""
    new = fresh(task.tokenizer)
    spelling = spelled(new, WORD)
    assert response_tokens(new, WORD, spelling) == spelling
    assert new.encode(WORD) == fresh(new).encode(WORD) != spelling    # nothing remembered
    canonical = new.encode(WORD)
    for ids in (new.encode(" awful"), spelling[:-1], [*spelling, new.vocab_size],
                [*spelling, new.eos_id, 40], None):
        assert response_tokens(new, WORD, ids) == canonical
    prompts = task.prompts("train")[:1]
    prefs = Preferences(prompts, [[WORD, WORD]], np.array([[1.0, 0.0]], np.float32),
                        np.zeros((1, 2), np.float32), [["x", "x"]],
                        [[new.encode(" awful"), spelling]])
    arrays = preference_arrays(new, prefs, TaskConfig(prompt_len=24, max_new_tokens=12),
                               max_len=64)
    np.testing.assert_array_equal(arrays["responses"][0, 0, :len(canonical)], canonical)
    np.testing.assert_array_equal(arrays["responses"][0, 1, :len(spelling)], spelling)


def test_best_of_n_pool_scores_the_sampled_ids(task):
    """``score_pool`` scores each pool response's stored ids, not its text's canonical encoding:
    with an RM that sums the tokens it reads, a spelled-out response scores Σ(spelled ids) −
    Σ(canonical ids) more than it does from a pool without ids (one stored before them); a
    canonical response the same either way."""
    from rlhf_jax.best_of_n import score_pool

    new = fresh(task.tokenizer)
    spelling, canonical = spelled(new, WORD), new.encode(WORD)
    assert spelling != canonical and new.decode(spelling, remember=False) == WORD
    prompt = task.prompts("heldout")[0]
    pool = {"uids": [prompt.uid], "texts": [[WORD, WORD]], "ids": [[spelling, canonical]],
            "gold": [[0.0, 0.0]]}
    shapes = TaskConfig(prompt_len=24, max_new_tokens=12)
    rm_sum = lambda params, tokens, mask: (tokens * mask).sum(-1).astype(np.float32)  # noqa: E731
    in_new_process = types.SimpleNamespace(tokenizer=new, prompts=task.prompts)   # no memory
    with_ids = score_pool(pool, in_new_process, shapes, rm_sum, None)
    without = score_pool({k: v for k, v in pool.items() if k != "ids"}, in_new_process, shapes,
                         rm_sum, None)
    np.testing.assert_allclose(with_ids[0] - without[0], [sum(spelling) - sum(canonical), 0])


@pytest.mark.slow
def test_dpo_from_a_finished_reward_run_is_the_same_in_a_new_process(tmp_path, monkeypatch):
    """The reward stage on the fixture task (a barely trained model: many sampled responses are
    not their text's canonical encoding), then DPO from it twice: in the process that sampled
    the comparisons, and with the tokenizers of a new process (no memory of decoded texts)."""
    from rlhf_jax import scripts
    from rlhf_jax.models import GPTConfig
    from rlhf_jax.stages.common import pipeline_task
    from rlhf_jax.stages.lm import PretrainConfig, SFTConfig
    from rlhf_jax.stages.offline import OfflineConfig
    from rlhf_jax.stages.reward import RewardConfig
    from rlhf_jax.train import OptimConfig

    shapes = TaskConfig(name="sentiment", prompt_len=17, max_new_tokens=8, options={
        "fortunes_dir": str(FIXTURE), "data_dir": str(tmp_path / "task"), "vocab_size": "320",
        "heldout_every": "5"})
    pre = PretrainConfig(task=shapes, model=GPTConfig(vocab_size=320, max_len=48, d_model=32,
                                                      n_layers=1, n_heads=2),
                         seq_len=32, batch_size=8, steps=10, log_every=5,
                         optim=OptimConfig(learning_rate=3e-3, warmup_steps=2))
    reward = RewardConfig(sft=SFTConfig(steps=0, pretrain=pre), steps=2, batch_prompts=4,
                          lm_readout=False, log_every=1, optim=OptimConfig(warmup_steps=1))
    scripts.run("reward", reward, tmp_path / "reward")
    dpo = OfflineConfig(reward_dir=str(tmp_path / "reward"), beta=0.1, steps=3, batch_prompts=4,
                        log_every=1, optim=OptimConfig(learning_rate=1e-3, warmup_steps=1))
    same = scripts.run("dpo", dpo, tmp_path / "same")
    sampler = pipeline_task(pre).tokenizer
    monkeypatch.setattr(bpe, "_LOADED", {})              # what a new process has
    new_task = pipeline_task(pre)
    assert new_task.tokenizer is not sampler
    prefs = read_preferences(tmp_path / "reward" / "data", "train", new_task)
    flat = [(t, i) for row, ids in zip(prefs.responses, prefs.response_ids)
            for t, i in zip(row, ids)]
    assert any(new_task.tokenizer.encode(t) != i for t, i in flat)   # the test can fail
    new = scripts.run("dpo", dpo, tmp_path / "new")
    assert {k: v for k, v in new.items() if not k.startswith("time")} == {
        k: v for k, v in same.items() if not k.startswith("time")}


def test_heldout_recomputations_read_the_stored_ids(task):
    """A held-out record's ``response_ids`` are what the exact KL, the perplexity and the RM's
    gold agreement read in a process whose tokenizer has no memory of the sampled texts: a
    spelled-out response gives the numbers of its spelled ids (a hand-written forward pass), a
    record stored before the ids those of its text's canonical encoding."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.data.batching import encode_prompts
    from rlhf_jax.evaluate import rm_gold_agreement, sequence_kl
    from rlhf_jax.models import create_model
    from rlhf_jax.models.config import preset
    from rlhf_jax.text_eval import perplexity_under

    new = fresh(task.tokenizer)
    spelling, canonical = spelled(new, WORD), new.encode(WORD)
    assert spelling != canonical and new.decode(spelling, remember=False) == WORD
    in_new_process = types.SimpleNamespace(tokenizer=new, prompts=task.prompts)
    prompt = task.prompts("heldout")[0]
    shapes = TaskConfig(prompt_len=24, max_new_tokens=12)
    records = [{"uid": prompt.uid, "sample": 0, "response": WORD, "response_ids": spelling,
                "score": 0.0},
               {"uid": prompt.uid, "sample": 1, "response": WORD, "response_ids": canonical,
                "score": 1.0}]
    old = [{k: v for k, v in r.items() if k != "response_ids"} for r in records]

    cfg = preset("test", vocab_size=new.vocab_size)
    model, params = create_model(cfg, jax.random.key(0))
    _, ref_params = create_model(cfg, jax.random.key(1))
    p_ids, p_mask = encode_prompts(new, [prompt], shapes.prompt_len)
    apply = jax.jit(lambda prm, tokens, mask: model.apply(prm, tokens, attention_mask=mask).logits)

    def logps(prm, ids):   # [prompt | response] by hand: log π of each response token
        tokens = jnp.asarray(np.concatenate([p_ids[0], ids])[None])
        mask = jnp.asarray(np.concatenate([p_mask[0], np.ones(len(ids), p_mask.dtype)])[None])
        logits = apply(prm, tokens, mask)[0]
        lp = jax.nn.log_softmax(logits[shapes.prompt_len - 1:-1], -1)
        return lp, lp[np.arange(len(ids)), np.asarray(ids)]

    def exact_kl(ids):     # Σ_t KL(π ‖ π_ref) over the response tokens and EOS
        lp, _ = logps(params, ids + [new.eos_id])
        lr, _ = logps(ref_params, ids + [new.eos_id])
        return float(jnp.sum(jnp.exp(lp) * (lp - lr)))

    kl = sequence_kl(model, params, model, ref_params, in_new_process, shapes, records, batch=2)
    np.testing.assert_allclose(kl, [exact_kl(spelling), exact_kl(canonical)], rtol=1e-4)
    kl_old = sequence_kl(model, params, model, ref_params, in_new_process, shapes, old, batch=2)
    np.testing.assert_allclose(kl_old, [exact_kl(canonical)] * 2, rtol=1e-4)
    # a response cut at the budget (12 tokens, no EOS sampled) counts its 12 positions only
    cut = (spelling * 2)[:shapes.max_new_tokens]
    lp, _ = logps(params, cut)
    lr, _ = logps(ref_params, cut)
    truncated = [{**records[0], "response": new.decode(cut, remember=False), "response_ids": cut}]
    np.testing.assert_allclose(
        sequence_kl(model, params, model, ref_params, in_new_process, shapes, truncated, batch=2),
        [float(jnp.sum(jnp.exp(lp) * (lp - lr)))], rtol=1e-4)

    # a record stored before the ids whose canonical encoding outgrew the budget: its first 12
    # tokens, as the sampler would have cut it (no error; the perplexity cuts it alike)
    long_ids = new.encode(WORD * 20)
    assert len(long_ids) > shapes.max_new_tokens
    legacy = [{"uid": prompt.uid, "sample": 0, "response": WORD * 20, "score": 0.0}, old[1]]
    head = long_ids[:shapes.max_new_tokens]
    lp, _ = logps(params, head)
    lr, _ = logps(ref_params, head)
    np.testing.assert_allclose(
        sequence_kl(model, params, model, ref_params, in_new_process, shapes, legacy, batch=2),
        [float(jnp.sum(jnp.exp(lp) * (lp - lr))), exact_kl(canonical)], rtol=1e-4)
    want = float(np.sign(sum(canonical) - sum(head)) == 1)   # gold ranks canonical (1) first
    rm_sum = lambda prm, tokens, mask: (tokens * mask).sum(-1).astype(np.float32)  # noqa: E731
    assert rm_gold_agreement(rm_sum, None, in_new_process, shapes, legacy) == want

    ppl = perplexity_under(model, params, in_new_process, records[:1], batch=2,
                           prompt_len=shapes.prompt_len, response_len=shapes.max_new_tokens)
    np.testing.assert_allclose(ppl, np.exp(-np.mean(logps(params, spelling)[1])), rtol=1e-4)
    ppl_old = perplexity_under(model, params, in_new_process, old[:1], batch=2,
                               prompt_len=shapes.prompt_len, response_len=shapes.max_new_tokens)
    np.testing.assert_allclose(ppl_old, np.exp(-np.mean(logps(params, canonical)[1])), rtol=1e-4)

    # an RM that sums the tokens it reads ranks the canonical response (gold 1) above the
    # spelled one (gold 0), whose ids sum lower: agreement 1; without ids the texts tie: 0
    assert sum(canonical) > sum(spelling)
    assert rm_gold_agreement(rm_sum, None, in_new_process, shapes, records) == 1.0
    assert rm_gold_agreement(rm_sum, None, in_new_process, shapes, old) == 0.0


class _Forgetful(bpe.RoundTripTokenizer):
    """The task's BPE decoding without remembering: what encoding a sampled text gives in a new
    process."""

    def decode(self, ids, *, remember: bool = True) -> str:
        return super().decode(ids, remember=False)


def test_best_of_n_ranks_and_records_the_sampled_ids(task):
    """Best-of-N scores each candidate's sampled ids (not its text's encoding) and stores the
    winner's: with an RM that sums the response tokens, every pick is the candidate whose
    *sampled* ids sum highest, and its record holds those ids."""
    import jax

    from rlhf_jax.evaluate import best_of_n, generate_ids
    from rlhf_jax.models import create_model
    from rlhf_jax.models.config import preset
    from rlhf_jax.sampling import SamplingConfig

    tok = _Forgetful(Tokenizer.from_str(task.tokenizer.to_json()), eos_ids=[2], pad_id=0,
                     bos_id=1)
    forgetful = types.SimpleNamespace(tokenizer=tok, prompts=task.prompts, judge=task.judge,
                                      summarize=task.summarize)
    model, params = create_model(preset("test", vocab_size=tok.vocab_size), jax.random.key(0))
    shapes = types.SimpleNamespace(prompt_len=24, max_new_tokens=10, eval_samples=2)
    n, key = 4, jax.random.key(3)
    lp = shapes.prompt_len
    rm_sum = lambda prm, tokens, mask: (tokens[:, lp:] * mask[:, lp:]).sum(-1) * 1.0  # noqa: E731

    _, records = best_of_n(model, params, rm_sum, None, forgetful, shapes, key, n=n)
    prompts = task.prompts("heldout")
    _, texts, ids = generate_ids(model, params, forgetful, prompts, key,
                                 n_samples=shapes.eval_samples * n,
                                 sampling=SamplingConfig(max_new_tokens=shapes.max_new_tokens),
                                 prompt_len=lp)
    eos = [tok.eos_id]
    moved = 0
    for r, (i, j) in zip(records, [(i, j) for i in range(len(prompts))
                                   for j in range(shapes.eval_samples)], strict=True):
        cands = range((i * shapes.eval_samples + j) * n, (i * shapes.eval_samples + j + 1) * n)
        sums = [sum(ids[c] + eos) for c in cands]
        best = list(cands)[int(np.argmax(sums))]
        assert (r["uid"], r["sample"]) == (prompts[i].uid, j)
        assert (r["response"], r["response_ids"]) == (texts[best], ids[best])
        encoded = [sum(tok.encode(texts[c]) + eos) for c in cands]
        moved += int(np.argmax(encoded)) != int(np.argmax(sums))
    assert moved, "no pick where the encoded texts rank otherwise: the test cannot tell"
