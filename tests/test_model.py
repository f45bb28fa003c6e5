"""The decoders: GPT-2's NumPy reference forward; for GPT-2 and the Llama family alike, padding
invariance, output positions, KV cache and heads; configs. (Llama parity with transformers:
``test_hf.py``.)"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import references as ref
from conftest import xla_env
from rlhf_jax.configs import ConfigError
from rlhf_jax.models import GPTConfig, create_model, init_cache, preset
from rlhf_jax.models.functional import count_params, transplant

ATOL = 1e-4


def _tiny(cfg):
    model, params = create_model(cfg, jax.random.key(0), heads=("value", "reward"))
    apply = jax.jit(lambda p, t, m: model.apply(p, t, attention_mask=m))
    return cfg, model, params, apply


@pytest.fixture(scope="module")
def gpt():
    return _tiny(preset("test"))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, gpt):
    """Each decoder family; the Llama one with grouped-query attention (4 query heads on 2 KV
    heads), q/k norms, q/k/v biases and an untied output layer."""
    if request.param == "gpt2":
        return gpt
    return _tiny(preset("llama-test", qk_norm=True, qkv_bias=True))


def _tokens(seed, shape, vocab):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


B, T = 3, 10   # one shape for every full forward in this file: each new shape is a compile


def test_forward_matches_numpy_reference(gpt):
    cfg, model, params, apply = gpt
    tokens = _tokens(0, (B, T), cfg.vocab_size)
    out = apply(params, tokens, np.ones_like(tokens))
    logits, hidden, scalars = ref.gpt_forward(params, cfg, tokens)
    assert out.logits.shape == (B, T, cfg.vocab_size) and out.logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.logits), logits, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out.hidden), hidden, atol=ATOL)
    for name in ("value", "reward"):
        np.testing.assert_allclose(np.asarray(out.scalars[name]), scalars[name], atol=ATOL)


def test_forward_with_padding_mask_matches_numpy_reference(gpt):
    cfg, model, params, apply = gpt
    tokens = _tokens(1, (B, T), cfg.vocab_size)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1],      # left padding
                     [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],      # right padding
                     [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    out = apply(params, tokens, mask)
    logits, _, scalars = ref.gpt_forward(params, cfg, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], logits[real], atol=ATOL)
    np.testing.assert_allclose(np.asarray(out.scalars["value"])[real], scalars["value"][real],
                               atol=ATOL)
    assert np.all(np.isfinite(np.asarray(out.logits)))   # fully-masked rows give no NaN


def test_reference_is_sensitive_to_params(gpt):
    """Guard: the reference would catch a wrong layer (here: one perturbed MLP bias)."""
    cfg, model, params, apply = gpt
    tokens = _tokens(2, (B, T), cfg.vocab_size)
    out = apply(params, tokens, np.ones_like(tokens))
    _, changed = create_model(cfg, jax.random.key(0), heads=("value", "reward"))  # a fresh copy
    pure = nnx.to_pure_dict(changed)
    pure["h"][1]["mlp"]["c_fc"]["bias"] = pure["h"][1]["mlp"]["c_fc"]["bias"] + 0.5
    nnx.replace_by_pure_dict(changed, pure)
    same, _, _ = ref.gpt_forward(params, cfg, tokens)
    logits, _, _ = ref.gpt_forward(changed, cfg, tokens)
    np.testing.assert_allclose(np.asarray(out.logits), same, atol=ATOL)
    assert np.abs(np.asarray(out.logits) - logits).max() > 10 * ATOL


def test_left_padded_row_equals_unpadded_row(tiny):
    """Row r is the sequence's first ``T - n_pad[r]`` tokens behind ``n_pad[r]`` pads (with
    arbitrary pad ids); causality makes its real logits equal the unpadded prefix logits."""
    cfg, model, params, apply = tiny
    seq = _tokens(3, (1, T), cfg.vocab_size)
    unpadded = np.repeat(seq, B, 0)
    n_pads = [0, 1, 4]
    garbage = _tokens(4, (B, T), cfg.vocab_size)
    padded, pmask = garbage.copy(), np.zeros((B, T), np.int32)
    for r, n in enumerate(n_pads):
        padded[r, n:] = seq[0, :T - n]
        pmask[r, n:] = 1
    a = apply(params, unpadded, np.ones_like(unpadded))
    b = apply(params, padded, pmask)
    for r, n in enumerate(n_pads):
        np.testing.assert_allclose(np.asarray(b.logits)[r, n:], np.asarray(a.logits)[r, :T - n],
                                   atol=ATOL, err_msg=f"n_pad={n}")
        np.testing.assert_allclose(np.asarray(b.scalars["reward"])[r, n:],
                                   np.asarray(a.scalars["reward"])[r, :T - n], atol=ATOL)


def test_right_padding_content_does_not_leak(tiny):
    cfg, model, params, apply = tiny
    seq = _tokens(5, (B, T), cfg.vocab_size)
    mask = np.zeros((B, T), np.int32)
    mask[:, :6] = 1
    seq2 = seq.copy()
    seq2[:, 6:] = (seq2[:, 6:] + 1) % cfg.vocab_size
    a, b = apply(params, seq, mask), apply(params, seq2, mask)
    np.testing.assert_allclose(np.asarray(a.logits)[:, :6], np.asarray(b.logits)[:, :6], atol=1e-6)


def test_output_positions_equal_the_sliced_full_output_and_its_gradient(tiny):
    """Running the last block at a subset of positions (a static slice, or per-row indices) gives
    the full forward's logits, hidden and scalars there — and the same parameter gradient."""
    cfg, model, params, apply = tiny
    tokens = _tokens(5, (B, T), cfg.vocab_size)
    mask = np.ones_like(tokens)
    mask[1, :2] = 0          # left padding
    mask[2, -3:] = 0         # right padding
    idx = np.array([[9, 2], [4, 4], [6, 0]], np.int32)      # per-row, repeats allowed
    full = apply(params, tokens, mask)
    for positions, want in ((slice(3, -1), lambda x: x[:, 3:-1]),
                            (jnp.asarray(idx), lambda x: np.take_along_axis(
                                x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1))):
        out = jax.jit(lambda p, pos=positions: model.apply(
            p, tokens, attention_mask=mask, output_positions=pos))(params)
        np.testing.assert_allclose(out.logits, want(np.asarray(full.logits)), atol=ATOL)
        np.testing.assert_allclose(out.hidden, want(np.asarray(full.hidden)), atol=ATOL)
        for h in ("value", "reward"):
            np.testing.assert_allclose(out.scalars[h], want(np.asarray(full.scalars[h])),
                                       atol=ATOL)

        def loss(p, sub):
            o = model.apply(p, tokens, attention_mask=mask,
                            output_positions=positions if sub else None)
            lg, v = (o.logits, o.scalars["value"]) if sub else (want(o.logits),
                                                                 want(o.scalars["value"]))
            return jnp.sum(jnp.sin(lg)) + jnp.sum(v ** 2)

        grad = jax.jit(jax.grad(loss), static_argnums=1)
        g_sub, g_full = (grad(params, s) for s in (True, False))
        for a, b in zip(jax.tree.leaves(g_sub), jax.tree.leaves(g_full)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_scalar_heads_shapes(tiny):
    cfg, model, params, apply = tiny
    tokens = _tokens(7, (B, T), cfg.vocab_size)
    out = apply(params, tokens, np.ones_like(tokens))
    assert set(out.scalars) == {"value", "reward"}
    for v in out.scalars.values():
        assert v.shape == (B, T) and v.dtype == jnp.float32
    assert out.hidden.shape == (B, T, cfg.d_model)
    assert out.cache is None
    # the two heads are distinct linear maps of the same hidden state
    assert not np.allclose(np.asarray(out.scalars["value"]), np.asarray(out.scalars["reward"]))
    plain, pparams = create_model(cfg, jax.random.key(0))
    o2 = jax.jit(lambda p, t: plain.apply(p, t, compute_logits=False))(pparams, tokens)
    assert o2.scalars == {} and o2.logits is None


@pytest.fixture(scope="module")
def cached_step(tiny):
    cfg, model, params, apply = tiny
    return jax.jit(lambda p, tok, pos, cache, idx, kvm: model.apply(
        p, tok, positions=pos, cache=cache, cache_index=idx, kv_mask=kvm))


def test_cached_decode_token_by_token_matches_full_forward(tiny, cached_step):
    cfg, model, params, apply = tiny
    tokens = _tokens(8, (B, T), cfg.vocab_size)
    full = apply(params, tokens, np.ones_like(tokens))
    cache = init_cache(cfg, B, T)
    kv_mask = jnp.ones((B, T), bool)
    for i in range(T):
        out = cached_step(params, tokens[:, i:i + 1], jnp.full((B, 1), i), cache, i, kv_mask)
        cache = out.cache
        assert out.logits.shape == (B, 1, cfg.vocab_size)
        np.testing.assert_allclose(np.asarray(out.logits)[:, 0], np.asarray(full.logits)[:, i],
                                   atol=ATOL, err_msg=f"step {i}")
        np.testing.assert_allclose(np.asarray(out.scalars["value"])[:, 0],
                                   np.asarray(full.scalars["value"])[:, i], atol=ATOL)
    assert len(cache) == cfg.n_layers
    assert cache[0][0].shape == (B, cfg.kv_heads, T, cfg.head_dim)   # KV heads only


def test_cached_prefill_of_left_padded_prompt_then_decode(tiny, cached_step):
    """Prefill a left-padded prompt into the cache, then decode; logits equal the full forward
    over ``[prompt | continuation]`` with the padding mask."""
    cfg, model, params, apply = tiny
    p, n = 6, T - 6
    prompt = _tokens(9, (B, p), cfg.vocab_size)
    pmask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], np.int32)
    cont = _tokens(10, (B, n), cfg.vocab_size)
    seq = np.concatenate([prompt, cont], 1)
    smask = np.concatenate([pmask, np.ones((B, n), np.int32)], 1)
    full = np.asarray(apply(params, seq, smask).logits)

    cache = init_cache(cfg, B, p + n)
    kv_mask = jnp.concatenate([jnp.asarray(pmask, bool), jnp.zeros((B, n), bool)], 1)
    pos = jnp.maximum(jnp.cumsum(pmask, -1) - 1, 0)
    out = cached_step(params, prompt, pos, cache, 0, kv_mask)
    real = pmask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], full[:, :p][real], atol=ATOL)
    cache = out.cache
    plen = pmask.sum(-1)
    for j in range(n):
        kv_mask = kv_mask.at[:, p + j].set(True)
        out = cached_step(params, cont[:, j:j + 1], jnp.asarray(plen + j)[:, None], cache, p + j,
                          kv_mask)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits)[:, 0], full[:, p + j], atol=ATOL,
                                   err_msg=f"decode step {j}")


def test_cached_call_requires_its_arguments(tiny):
    cfg, model, params, apply = tiny
    with pytest.raises(ValueError, match="kv_mask"):
        model.apply(params, jnp.zeros((1, 1), jnp.int32), cache=init_cache(cfg, 1, 4),
                    cache_index=0)


def test_transplant_copies_trunk_and_keeps_new_head():
    cfg = preset("test")
    _, src = create_model(cfg, jax.random.key(1))
    _, dst = create_model(cfg, jax.random.key(2), heads=("reward",))
    out = transplant(src, dst)
    out_d, src_d, dst_d = (nnx.to_pure_dict(x) for x in (out, src, dst))
    head = out_d.pop("heads")
    np.testing.assert_array_equal(head["reward"]["kernel"], dst_d["heads"]["reward"]["kernel"])
    np.testing.assert_array_equal(head["reward"]["bias"], dst_d["heads"]["reward"]["bias"])
    src_d.pop("heads", None)
    jax.tree.map(np.testing.assert_array_equal, out_d, src_d)
    # src and dst differ in the trunk, so the copy actually happened
    assert not np.array_equal(src_d["wte"]["embedding"], dst_d["wte"]["embedding"])
    # the result has dst's structure (a reward model's params)
    assert jax.tree.structure(out) == jax.tree.structure(dst)


def test_transplant_skips_shape_mismatches():
    _, src = create_model(preset("test", vocab_size=40), jax.random.key(1))
    _, dst = create_model(preset("test"), jax.random.key(2))
    out_d = nnx.to_pure_dict(transplant(src, dst))
    src_d, dst_d = nnx.to_pure_dict(src), nnx.to_pure_dict(dst)
    np.testing.assert_array_equal(out_d["wte"]["embedding"], dst_d["wte"]["embedding"])
    np.testing.assert_array_equal(out_d["wpe"]["embedding"], src_d["wpe"]["embedding"])


@pytest.mark.parametrize("kw, field", [
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=-1), "n_layers"),
    (dict(ln_eps=0.0), "ln_eps"),
    (dict(d_ff=-2), "d_ff"),
])
def test_gptconfig_validation_names_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        GPTConfig(**kw)
    with pytest.raises(ValueError, match=field):   # ConfigError is a ValueError
        preset("test", **kw)


def test_preset_unknown_name():
    with pytest.raises(KeyError, match="nope"):
        preset("nope")


def test_bench_param_count():
    cfg = preset("bench")
    abstract = nnx.eval_shape(lambda: create_model(cfg, jax.random.key(0))[1])
    n = count_params(abstract)
    assert n == ref.param_count_formula(cfg)
    v, p, d, nl = cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.n_layers
    assert n == v * d + p * d + nl * (12 * d * d + 13 * d) + 2 * d
    assert n == 3_356_160


def test_param_count_with_heads():
    cfg = preset("test")
    _, params = create_model(cfg, jax.random.key(0), heads=("value", "reward"))
    assert count_params(params) == ref.param_count_formula(cfg, n_heads_scalar=2)


_SHARDED_DROPOUT = """
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from rlhf_jax.models import GPTConfig, LlamaConfig, create_model
from rlhf_jax.ops import token_logprobs
from rlhf_jax.parallel import make_mesh, replicate, shard_batch
assert len(jax.devices()) == 2
row = np.random.RandomState(0).randint(0, 64, (1, 16))
tokens = np.repeat(row, 4, 0)                              # 4 identical rows
small = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_len=16, dropout=0.3)
for cfg in (GPTConfig(**small), LlamaConfig(**small, n_kv_heads=1)):
    model, params = create_model(cfg, jax.random.key(0))
    def per_row(params, tokens, key):
        logits = model.apply(params, tokens, dropout_key=key).logits[:, :-1]
        return token_logprobs(logits, tokens[:, 1:]).sum(-1)
    key = jax.random.key(1)
    one = np.asarray(jax.jit(per_row)(params, tokens, key))
    for mesh in (make_mesh(jax.devices()[:1]), make_mesh()):
        f = jax.jit(jax.shard_map(per_row, mesh=mesh, in_specs=(P(), P("data"), P()),
                                  out_specs=P("data")))
        got = np.asarray(f(replicate(params, mesh), shard_batch(tokens, mesh), key))
        assert len(set(np.round(got, 4))) == 4, got     # every row its own mask
        np.testing.assert_allclose(got, one, rtol=1e-5)
print("ok")
"""


def test_dropout_masks_differ_between_shards_and_match_one_device():
    """Under shard_map with a replicated step key (``parallel.data_parallel``), each shard must
    not draw the same dropout masks: on 2 devices, 4 identical rows get 4 different masks, the
    ones the same batch gets on one device."""
    env = xla_env(2, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED_DROPOUT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
