"""Sampling: determinism, per-example keys, greedy vs full forward, padding, log-probs, top-k/p, EOS.

Every ``sample`` compile costs seconds, so the tests share a handful of shapes/configs:
batches of 4 prompts of length P=8 (and subsets of 2 prompts re-padded to P=12).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import references as ref
from rlhf_jax.configs import ConfigError
from rlhf_jax.models import create_model, preset
from rlhf_jax.sampling import (SamplingConfig, choose_tokens, filter_logits, response_logits,
                               sample)

P, N, EXTRA = 8, 8, 4
NEVER = 10_000                 # an eos id the model can never emit
PAD = 0
SAMPLED = SamplingConfig(max_new_tokens=N, temperature=0.7)
GREEDY = SamplingConfig(max_new_tokens=N, temperature=0.0)
TOPK = SamplingConfig(max_new_tokens=N, temperature=1.0, top_k=3)
TOPP = SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=0.6)

_sample = jax.jit(sample, static_argnames=("model", "cfg", "keep_outputs"))


@pytest.fixture(scope="module")
def setup():
    cfg = preset("test")
    model, params = create_model(cfg, jax.random.key(0))
    # sharpen the random model (logit std ~1 instead of ~0.1) so that greedy margins are large
    # and top-k / top-p sets are small
    params = jax.tree.map(lambda x: 3.0 * x, params)
    rng = np.random.default_rng(0)
    lengths = [3, 5, 6, 8]                               # row 3 is unpadded
    prompts = np.full((4, P), PAD, np.int32)
    pmask = np.zeros((4, P), np.int32)
    for i, n in enumerate(lengths):
        prompts[i, P - n:] = rng.integers(3, cfg.vocab_size, n)
        pmask[i, P - n:] = 1
    recompute = jax.jit(lambda p, pr, pm, r, rm: response_logits(model, p, pr, pm, r, rm)[0])
    return model, params, prompts, pmask, recompute


def _run(setup, scfg, key=0, eos=NEVER, prompts=None, pmask=None, ids=None):
    model, params, p0, m0, _ = setup
    prompts = p0 if prompts is None else prompts
    pmask = m0 if pmask is None else pmask
    out = _sample(model, params, jnp.asarray(prompts), jnp.asarray(pmask), jax.random.key(key),
                  cfg=scfg, eos_id=eos, pad_id=PAD,
                  example_ids=None if ids is None else jnp.asarray(ids))
    return jax.tree.map(np.asarray, out)


def _repad(setup, rows):
    """Rows of the shared batch, left-padded with EXTRA more pads (P + EXTRA)."""
    _, _, prompts, pmask, _ = setup
    # the ids under padding are arbitrary: use non-PAD garbage to show they are ignored
    garbage = (np.arange(len(rows) * EXTRA).reshape(len(rows), EXTRA) % 7 + 3).astype(np.int32)
    return (np.concatenate([garbage, prompts[rows]], 1),
            np.concatenate([np.zeros_like(garbage), pmask[rows]], 1))


def _recompute_logits(setup, tokens, mask):
    model, params, prompts, pmask, recompute = setup
    return np.asarray(recompute(params, prompts, pmask, tokens, mask), np.float64)


# --------------------------------------------------------------------------- determinism / keys
def test_same_key_same_samples_different_key_differs(setup):
    a, b, c = _run(setup, SAMPLED, 0), _run(setup, SAMPLED, 0), _run(setup, SAMPLED, 1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.tokens.shape == a.logprobs.shape == a.mask.shape == (4, N)
    assert a.tokens.dtype == np.int32


def test_examples_do_not_depend_on_batch_composition_or_padding(setup):
    """Each example's sample is a function of (key, example id, prompt) only: sampling subsets of
    the batch (different size, order and extra left padding) gives the same tokens per example."""
    full = _run(setup, SAMPLED, 3)
    for rows in ([3, 1], [0, 2], [2, 2]):
        prompts, pmask = _repad(setup, rows)
        sub = _run(setup, SAMPLED, 3, prompts=prompts, pmask=pmask, ids=rows)
        for j, r in enumerate(rows):
            np.testing.assert_array_equal(sub.tokens[j], full.tokens[r], err_msg=f"rows {rows}")
            np.testing.assert_array_equal(sub.mask[j], full.mask[r])
            np.testing.assert_allclose(sub.logprobs[j], full.logprobs[r], atol=1e-5)
    # the example id, not the row, picks the randomness: same prompt, other id -> other sample
    prompts, pmask = _repad(setup, [1, 1])
    other = _run(setup, SAMPLED, 3, prompts=prompts, pmask=pmask, ids=[1, 7])
    np.testing.assert_array_equal(other.tokens[0], full.tokens[1])
    assert not np.array_equal(other.tokens[1], full.tokens[1])


# --------------------------------------------------------------------------- greedy
def _greedy_reference(setup):
    """Greedy decoding by repeated full forward passes (no cache): N calls, argmax each time."""
    _, _, prompts, _, _ = setup
    gen = np.zeros((4, N), np.int32)
    logps = np.zeros((4, N))
    for k in range(N):
        rmask = (np.arange(N) < k + 1).astype(np.int32)[None].repeat(4, 0)
        logits = _recompute_logits(setup, gen, rmask)[:, k]        # predicts response token k
        gen[:, k] = logits.argmax(-1)
        logps[:, k] = ref.log_softmax(logits)[np.arange(4), gen[:, k]]
    return gen, logps


def test_greedy_with_cache_equals_repeated_full_forward_argmax(setup):
    out = _run(setup, GREEDY)
    want, want_logp = _greedy_reference(setup)
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.mask, np.ones((4, N)))
    # greedy reports untempered model log-probs of the argmax tokens
    np.testing.assert_allclose(out.logprobs, want_logp, atol=1e-5)
    # greedy ignores the key
    np.testing.assert_array_equal(_run(setup, GREEDY, key=5).tokens, out.tokens)


def test_greedy_left_padded_prompt_continues_like_unpadded(setup):
    full = _run(setup, GREEDY)
    prompts, pmask = _repad(setup, [3, 0])       # row 3 is unpadded in the shared batch
    sub = _run(setup, GREEDY, prompts=prompts, pmask=pmask, ids=[3, 0])
    np.testing.assert_array_equal(sub.tokens, full.tokens[[3, 0]])
    np.testing.assert_allclose(sub.logprobs, full.logprobs[[3, 0]], atol=1e-5)


def test_sampled_left_padded_prompt_continues_like_unpadded(setup):
    full = _run(setup, SAMPLED, 11)
    prompts, pmask = _repad(setup, [3, 0])
    sub = _run(setup, SAMPLED, 11, prompts=prompts, pmask=pmask, ids=[3, 0])
    np.testing.assert_array_equal(sub.tokens, full.tokens[[3, 0]])


# --------------------------------------------------------------------------- log-probs
def test_sampled_logprobs_equal_tempered_log_softmax_of_full_forward(setup):
    for key in (0, 1):
        out = _run(setup, SAMPLED, key)
        logits = _recompute_logits(setup, out.tokens, out.mask)
        want = ref.token_logprobs(logits / SAMPLED.temperature, out.tokens)
        m = out.mask.astype(bool)
        np.testing.assert_allclose(out.logprobs[m], want[m], atol=1e-5)
        assert np.all(out.logprobs[~m] == 0.0)
        # and not the untempered ones (the test can tell the difference)
        untempered = ref.token_logprobs(logits, out.tokens)
        assert np.abs(untempered[m] - out.logprobs[m]).max() > 1e-3


def test_kept_outputs_equal_the_full_forward_and_leave_the_sample_unchanged():
    """``keep_outputs``: each step's logits and scalar heads equal a full forward's at the
    position that predicts that token (cached decode = full forward), EOS and padding included;
    the tokens and log-probs are those of the call without it."""
    cfg = preset("test")
    model, params = create_model(cfg, jax.random.key(2), heads=("value",))
    params = jax.tree.map(lambda x: 3.0 * x, params)
    prompts = np.array([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]], np.int32)
    pmask = (prompts != 0).astype(np.int32)
    scfg = SamplingConfig(max_new_tokens=5, temperature=1.0)
    key = jax.random.key(4)
    free = _sample(model, params, prompts, pmask, key, cfg=scfg, eos_id=NEVER, pad_id=PAD)
    # EOS := row 0's third free token, so row 0 stops early and post-EOS positions are covered
    kw = dict(cfg=scfg, eos_id=int(free.tokens[0, 2]), pad_id=PAD)
    kept = _sample(model, params, prompts, pmask, key, keep_outputs=True, **kw)
    plain = _sample(model, params, prompts, pmask, key, **kw)
    assert int(kept.mask[0].sum()) <= 3
    for a, b in zip(plain[:3], kept[:3]):
        np.testing.assert_array_equal(a, b)
    assert plain.logits is None and plain.scalars is None
    logits, out = response_logits(model, params, prompts, pmask, kept.tokens, kept.mask)
    m = np.asarray(kept.mask, bool)
    assert kept.logits.shape == (2, 5, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(kept.logits)[m], np.asarray(logits)[m], atol=1e-4)
    np.testing.assert_allclose(np.asarray(kept.scalars["value"])[m],
                               np.asarray(out.scalars["value"])[m], atol=1e-4)



def test_bf16_sampler_logprobs_match_the_bf16_trainer_and_are_close_to_float32(setup,
                                                                              monkeypatch):
    """Under ``precision="bf16"`` the sampler decodes through a bf16 KV cache: its log-probs equal
    the bf16 full forward's (the trainer's recompute) to float32 accuracy, and differ from the
    float32 model's by bf16 rounding only (the sampler/trainer mismatch of a bf16 sampler against
    a float32 trainer)."""
    model, params, prompts, pmask, recompute = setup
    monkeypatch.setenv("RLHF_JAX_FORCE_BF16", "1")      # also on a CPU without bf16 (tiny model)
    m16 = create_model(model.cfg.replace(precision="bf16"), jax.random.key(0))[0]
    out = _sample(m16, params, prompts, pmask, jax.random.key(0), cfg=SAMPLED, eos_id=NEVER,
                  pad_id=PAD)
    m = np.asarray(out.mask, bool)
    logits16 = response_logits(m16, params, prompts, pmask, out.tokens, out.mask)[0]
    want16 = ref.token_logprobs(np.asarray(logits16, np.float64) / SAMPLED.temperature, out.tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], want16[m], atol=1e-5)
    want32 = ref.token_logprobs(_recompute_logits(setup, out.tokens, out.mask)
                                / SAMPLED.temperature, out.tokens)
    diff = np.abs(np.asarray(out.logprobs)[m] - want32[m])
    assert 1e-5 < diff.max() < 0.05


def test_top_k_tokens_are_among_k_largest_and_logprobs_renormalised(setup):
    k = TOPK.top_k
    not_argmax = 0
    for key in range(4):
        out = _run(setup, TOPK, key)
        logits = _recompute_logits(setup, out.tokens, out.mask)
        m = out.mask.astype(bool)
        top = np.argsort(-logits, -1)[..., :k]
        inside = (top == out.tokens[..., None]).any(-1)
        assert inside[m].all(), f"key {key}: a token outside the top {k}"
        not_argmax += int((top[..., 0] != out.tokens)[m].sum())
        # renormalised over the k kept tokens
        kth = np.sort(logits, -1)[..., -k][..., None]
        restricted = np.where(logits >= kth, logits, -np.inf)
        want = ref.token_logprobs(restricted, out.tokens)
        np.testing.assert_allclose(out.logprobs[m], want[m], atol=1e-5)
    assert not_argmax > 0    # it really samples (not greedy), so the check above has teeth


def test_top_p_tokens_are_inside_the_nucleus(setup):
    top_p = TOPP.top_p
    sizes, outside_k = [], 0
    for key in range(4):
        out = _run(setup, TOPP, key)
        logits = _recompute_logits(setup, out.tokens, out.mask) / TOPP.temperature
        m = out.mask.astype(bool)
        probs = ref.softmax(logits)
        for b, t in zip(*np.nonzero(m)):
            p = probs[b, t]
            mass_above = p[p > p[out.tokens[b, t]]].sum()    # mass strictly more likely
            assert mass_above < top_p + 1e-5, (key, b, t)
            order = np.sort(p)[::-1]
            sizes.append(int(np.searchsorted(np.cumsum(order), top_p) + 1))
            outside_k += int(mass_above > 0)
        # log-probs are renormalised over the nucleus
        for b, t in zip(*np.nonzero(m)):
            p = probs[b, t]
            order = np.argsort(-p)
            before = np.cumsum(p[order]) - p[order]
            keep = order[before < top_p]
            want = np.log(p[out.tokens[b, t]] / p[keep].sum())
            np.testing.assert_allclose(out.logprobs[b, t], want, atol=1e-4)
    assert np.mean(sizes) < 0.5 * 64     # the nucleus is a real restriction of the vocabulary
    assert outside_k > 0                 # and sampling is not greedy


def test_filter_logits_top_p_keeps_smallest_set_with_enough_mass():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], np.float32))
    out = np.asarray(filter_logits(jnp.asarray(logits), temperature=1.0, top_p=0.7))
    np.testing.assert_array_equal(np.isfinite(out), [[1, 1, 0, 0], [0, 0, 1, 1]])
    out = np.asarray(filter_logits(jnp.asarray(logits), temperature=1.0, top_p=0.01))
    np.testing.assert_array_equal(np.isfinite(out), [[1, 0, 0, 0], [0, 0, 0, 1]])
    out = np.asarray(filter_logits(jnp.asarray(logits), temperature=2.0, top_k=2))
    np.testing.assert_array_equal(np.isfinite(out), [[1, 1, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_allclose(out[0, :2], logits[0, :2] / 2.0, rtol=1e-6)
    # top_k beyond the vocabulary keeps it all (not an error from lax.top_k)
    out = np.asarray(filter_logits(jnp.asarray(logits), temperature=1.0, top_k=9))
    np.testing.assert_allclose(out, logits, rtol=1e-6)


def test_filter_logits_top_p_accepts_leading_dims():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 10)), jnp.float32)
    got = filter_logits(x, temperature=1.0, top_p=0.5)
    want = jnp.stack([filter_logits(x[:, i], temperature=1.0, top_p=0.5) for i in range(3)], 1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_inverse_cdf_draw_on_a_uniform_grid_reproduces_the_filtered_distribution():
    # u on an evenly spaced grid of M points: the share of each token is its probability to
    # within 1/M (a deterministic check of the draw, no sampling noise)
    logits = jnp.asarray([[2.0, -1.0, 0.5, 3.0, 1.0, -4.0],      # top-4 drops ids 1 and 5
                          [-3.0, 0.0, 1.0, 0.2, 2.0, 1.5]])       # top-4 drops ids 0 and 3
    cfg = SamplingConfig(temperature=0.8, top_k=4)
    m = 20_000
    u = (np.arange(m) + 0.5) / m
    want = ref.softmax(np.asarray(filter_logits(logits, temperature=0.8, top_k=4), np.float64))
    for row in range(2):
        tok, logp = choose_tokens(jnp.broadcast_to(logits[row], (m, 6)), jnp.asarray(u), cfg)
        tok, logp = np.asarray(tok), np.asarray(logp)
        share = np.bincount(tok, minlength=6) / m
        np.testing.assert_allclose(share, want[row], atol=1.5 / m)
        np.testing.assert_allclose(logp, np.log(want[row][tok]), rtol=1e-5)
        assert (np.diff(tok[np.argsort(u)]) != 0).sum() == 3   # monotone in u: 4 runs of ids


def test_inverse_cdf_draw_never_picks_a_token_outside_the_support_at_the_ends():
    # the vocabulary's first and last ids are filtered out; u = 0 and the largest float32 below 1
    # must land on the first / last id of the support
    logits = jnp.asarray([[-9.0, 1.0, 0.3, 2.0, -9.0]] * 2)
    u = jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))], jnp.float32)
    tok, logp = choose_tokens(logits, u, SamplingConfig(temperature=1.0, top_k=3))
    np.testing.assert_array_equal(np.asarray(tok), [1, 3])
    assert np.isfinite(np.asarray(logp)).all()


# --------------------------------------------------------------------------- EOS
def test_greedy_eos_stops_and_pads(setup):
    free = _run(setup, GREEDY)
    eos = int(free.tokens[0, 0])          # row 0's first greedy token becomes EOS
    out = _run(setup, GREEDY, eos=eos)
    np.testing.assert_array_equal(out.tokens[0], [eos] + [PAD] * (N - 1))
    np.testing.assert_array_equal(out.mask[0], [1] + [0] * (N - 1))
    np.testing.assert_array_equal(out.logprobs[0, 1:], 0.0)
    _check_eos_truncation(free, out, eos)


def test_sampled_eos_truncates_the_free_sample(setup):
    free = _run(setup, SAMPLED, 4)
    eos = int(free.tokens[1, 3])
    out = _run(setup, SAMPLED, 4, eos=eos)
    _check_eos_truncation(free, out, eos)
    assert out.mask.sum() < free.mask.sum()


def test_several_eos_ids_end_a_response_at_the_first_of_any(setup):
    """A tuple of EOS ids (Llama 3's end-of-text and end-of-turn) cuts each row after the first
    of any of them: the same as cutting at each id alone and keeping the earlier cut."""
    free = _run(setup, SAMPLED, 4)
    a, b = int(free.tokens[0, 2]), int(free.tokens[1, 1])
    out = _run(setup, SAMPLED, 4, eos=(a, b))
    _check_eos_truncation(free, out, (a, b))
    assert out.mask.sum() < free.mask.sum()
    with_a, with_b = _run(setup, SAMPLED, 4, eos=a), _run(setup, SAMPLED, 4, eos=b)
    np.testing.assert_array_equal(out.mask, with_a.mask & with_b.mask)


def test_stop_ids_are_every_eos_of_a_checkpoint(tmp_path):
    from rlhf_jax.data.tokenizers import HFTokenizer, WordTokenizer, stop_ids

    word = WordTokenizer("a b c".split())
    word.hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text('{"eos_token_id": [2, 4], "bos_token_id": 1}')
    tok = HFTokenizer.from_pretrained(tmp_path)
    assert (tok.eos_id, tok.eos_ids, tok.pad_id, stop_ids(tok)) == (2, (2, 4), 2, (2, 4))
    assert tok.decode([3, 5, 4, 3]) == "a c"        # decoding stops at any of them too
    assert stop_ids(word) == 2


def _check_eos_truncation(free, out, eos):
    """``out`` = ``free`` cut after the first ``eos`` (an id or a tuple of ids) of each row, then
    pad with mask 0."""
    for b in range(free.tokens.shape[0]):
        hits = np.nonzero(np.isin(free.tokens[b], eos))[0]
        stop = hits[0] + 1 if len(hits) else N
        np.testing.assert_array_equal(out.tokens[b, :stop], free.tokens[b, :stop])
        np.testing.assert_array_equal(out.tokens[b, stop:], PAD)
        np.testing.assert_array_equal(out.mask[b], np.arange(N) < stop)
        np.testing.assert_allclose(out.logprobs[b, :stop], free.logprobs[b, :stop], atol=1e-6)
        np.testing.assert_array_equal(out.logprobs[b, stop:], 0.0)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=1e-10), "temperature"),   # logits / T overflows: 0 is greedy
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_sampling_config_validation_names_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        SamplingConfig(**kw)


def test_sample_rejects_context_overflow(setup):
    model, params, prompts, pmask, _ = setup
    with pytest.raises(ConfigError, match="max_new_tokens"):
        sample(model, params, jnp.asarray(prompts), jnp.asarray(pmask), jax.random.key(0),
               cfg=SamplingConfig(max_new_tokens=model.cfg.max_len - P + 1), eos_id=NEVER,
               pad_id=PAD)
