"""bf16 mixed precision (``precision="bf16"`` on a model config): what stays float32, closeness to
the float32 model, cached decoding, an exactly zero KL between identical models, and the refusal
on a CPU without bf16 instructions (simulated flag lists).

Tolerances, measured on the tiny test models (logit std ~0.1): bf16 logits are within 0.05 × the
logits' std of float32 (measured ~0.01 ×), gradients within 3% of float32 in global relative norm
(measured 0.3-0.4%)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops, precision
from rlhf_jax.configs import ConfigError
from rlhf_jax.models import create_model, init_cache, preset
from rlhf_jax.models.functional import transplant

B, T = 3, 10
HEADS = ("value",)
# matmuls per layer: GPT-2 c_attn, q·kᵀ, p·v, c_proj, c_fc, c_proj; Llama q, k, v, o, q·kᵀ, p·v,
# gate, up, down; plus the LM head
BF16_MATMULS = {"test": 2 * 6 + 1, "llama-test": 2 * 9 + 1}
FLOAT_ONLY = {"reduce_sum", "reduce_max", "reduce_min", "argmax", "exp", "log", "log1p", "rsqrt",
              "sqrt", "tanh", "logistic", "erf", "div", "cumsum", "cumlogsumexp"}


def _models(name):
    cfg = preset(name, qk_norm=True) if name.startswith("llama") else preset(name)
    m32, params = create_model(cfg, jax.random.key(0), heads=HEADS)
    with pytest.MonkeyPatch.context() as mp:      # also on a CPU without bf16 (slow, but tiny)
        mp.setenv(precision.FORCE_ENV, "1")
        m16, params16 = create_model(cfg.replace(precision="bf16"), jax.random.key(0),
                                     heads=HEADS)
    return m32, m16, params, params16


def _loss(params, model, tokens, mask):
    out = model.apply(params, tokens, attention_mask=mask)
    lp = ops.token_logprobs(out.logits[:, :-1], tokens[:, 1:])
    return -ops.masked_mean(lp, mask[:, 1:]) + jnp.mean(out.scalars["value"] ** 2)


@jax.jit(static_argnums=1)
def _forward_and_grad(params, model, tokens, mask):
    return model.apply(params, tokens, attention_mask=mask), jax.grad(_loss)(params, model,
                                                                             tokens, mask)


@pytest.fixture(scope="module", params=["test", "llama-test"])
def pair(request):
    """``(name, float32 model, bf16 model, params, bf16 model's own init, tokens, mask,
    {precision: (output, gradients)})``."""
    tokens = np.random.default_rng(0).integers(0, 64, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0                                            # a left-padded row
    m32, m16, params, params16 = _models(request.param)
    runs = {m.cfg.precision: _forward_and_grad(params, m, tokens, mask) for m in (m32, m16)}
    return request.param, m32, m16, params, params16, tokens, mask, runs


def _eqns(jaxpr):
    """Every equation of a jaxpr and its sub-jaxprs (jit, custom_vjp, scan, cond bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _dtypes(eqn):
    return [str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype")]


def _check_float32_outside_matmuls(jaxpr, name, n_bf16):
    dots = [e for e in _eqns(jaxpr) if e.primitive.name == "dot_general"]
    bf16 = [e for e in dots if _dtypes(e) == ["bfloat16", "bfloat16"]]
    f32 = [e for e in dots if _dtypes(e) == ["float32", "float32"]]
    assert len(bf16) + len(f32) == len(dots), [_dtypes(e) for e in dots]
    assert all(e.params["preferred_element_type"] == jnp.float32 for e in bf16)
    assert all(str(e.outvars[0].aval.dtype) == "float32" for e in dots)
    if n_bf16 is not None:
        assert len(bf16) == n_bf16, name
        assert len(f32) == len(HEADS)                      # the scalar heads, in float32
    else:                                                  # backward: each matmul's 2 products
        assert len(bf16) >= 2 * BF16_MATMULS[name], len(bf16)
    for e in _eqns(jaxpr):                 # statistics, softmax, activations: never in bf16
        if e.primitive.name in FLOAT_ONLY:
            assert "bfloat16" not in _dtypes(e), (e.primitive.name, _dtypes(e))


def test_what_stays_float32(pair):
    """Parameters, gradients, logits, hidden, heads: float32. Every matmul but the heads' takes
    bf16 inputs and accumulates in float32; no reduction, exp/log or activation runs in bf16
    (LayerNorm/RMSNorm statistics, softmax, log-softmax, GELU/SiLU), forward or backward."""
    name, m32, m16, params, params16, tokens, mask, runs = pair
    assert {str(x.dtype) for x in jax.tree.leaves(params16)} == {"float32"}
    out, grads = runs["bf16"]
    assert {str(x.dtype) for x in jax.tree.leaves(grads)} == {"float32"}
    assert out.logits.dtype == out.hidden.dtype == out.scalars["value"].dtype == jnp.float32
    fwd = jax.make_jaxpr(lambda p: m16.apply(p, tokens, attention_mask=mask))(params)
    _check_float32_outside_matmuls(fwd.jaxpr, name, BF16_MATMULS[name])
    grad = jax.make_jaxpr(lambda p: jax.grad(_loss)(p, m16, tokens, mask))(params)
    _check_float32_outside_matmuls(grad.jaxpr, name, None)
    assert {str(v.aval.dtype) for v in grad.jaxpr.outvars} == {"float32"}
    # the float32 model has no bf16 anywhere
    fwd32 = jax.make_jaxpr(lambda p: m32.apply(p, tokens, attention_mask=mask))(params)
    assert not any("bfloat16" in _dtypes(e) for e in _eqns(fwd32.jaxpr))


def test_bf16_forward_and_gradients_close_to_float32(pair):
    name, m32, m16, params, params16, tokens, mask, runs = pair
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(params16)))
    (o32, g32), (o16, g16) = runs["float32"], runs["bf16"]
    real = mask.astype(bool)
    err = np.abs(np.asarray(o16.logits - o32.logits))[real]
    scale = float(np.std(np.asarray(o32.logits)[real]))
    assert err.max() <= 0.05 * scale and err.max() > 0       # bf16 really ran
    lp32, lp16 = (ops.token_logprobs(o.logits[:, :-1], tokens[:, 1:]) for o in (o32, o16))
    np.testing.assert_allclose(lp16, lp32, atol=0.05 * scale)
    np.testing.assert_allclose(o16.scalars["value"], o32.scalars["value"], atol=0.05)
    flat32, flat16 = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (g32, g16))
    assert bool(jnp.all(jnp.isfinite(flat16)))
    rel = float(jnp.linalg.norm(flat16 - flat32) / jnp.linalg.norm(flat32))
    assert 0 < rel < 0.03, rel


def test_bf16_cached_decode_matches_full_forward(pair):
    """Token-by-token decoding through a bf16 KV cache gives the bf16 full forward's logits: the
    cache holds exactly the bf16 keys/values the full forward multiplies by (measured difference
    0 on both tiny models; the tolerance allows a different accumulation order)."""
    name, _, m16, params, _, tokens, _, _ = pair
    cfg = m16.cfg
    full = jax.jit(m16.apply)(params, tokens)
    cache = init_cache(cfg, B, T)
    assert cache[0][0].dtype == jnp.bfloat16
    assert init_cache(cfg, B, T, jnp.float32)[0][0].dtype == jnp.float32
    step = jax.jit(lambda p, tok, i, c: m16.apply(p, tok, positions=jnp.full((B, 1), i), cache=c,
                                                  cache_index=i, kv_mask=jnp.ones((B, T), bool)))
    scale = float(jnp.std(full.logits))
    for i in range(T):
        out = step(params, tokens[:, i:i + 1], i, cache)
        cache = out.cache
        np.testing.assert_allclose(out.logits[:, 0], full.logits[:, i], atol=0.01 * scale,
                                   err_msg=f"step {i}")
    assert cache[0][0].dtype == jnp.bfloat16


def test_kl_between_identical_bf16_models_is_exactly_zero(pair):
    """A policy with a value head and a reference model without one (separately built and
    compiled, as PPO's) read the same parameters: their token log-probs agree bit for bit, so
    every KL estimate is exactly 0."""
    name, _, m16, params, _, tokens, mask, runs = pair
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(precision.FORCE_ENV, "1")
        ref, ref_params = create_model(m16.cfg, jax.random.key(1))
    ref_params = transplant(params, ref_params)             # the policy's trunk and LM head
    pol_lp = ops.token_logprobs(runs["bf16"][0].logits[:, :-1], tokens[:, 1:])
    ref_lp = jax.jit(lambda p: ops.token_logprobs(
        ref.apply(p, tokens, attention_mask=mask).logits[:, :-1], tokens[:, 1:]))(ref_params)
    log_ratio = np.asarray(pol_lp - ref_lp)
    assert np.all(log_ratio == 0.0)
    assert np.all(np.expm1(log_ratio) - log_ratio == 0.0)     # the k3 estimator too


# ----------------------------------------------------------------------------- the refusal
NO_BF16 = frozenset({"fpu", "avx2", "fma", "avx512f", "avx512bw"})


@pytest.mark.parametrize("flags, backend, env, refused", [
    (NO_BF16, "cpu", {}, True),
    (NO_BF16, "cpu", {precision.FORCE_ENV: "0"}, True),
    (None, "cpu", {}, True),                                  # /proc/cpuinfo unreadable
    (NO_BF16 | {"avx512_bf16"}, "cpu", {}, False),
    (NO_BF16 | {"amx_bf16"}, "cpu", {}, False),
    (NO_BF16, "cpu", {precision.FORCE_ENV: "1"}, False),
    (NO_BF16, "gpu", {}, False),
    (NO_BF16, "tpu", {}, False),
])
def test_bf16_refused_on_cpu_without_bf16_instructions(flags, backend, env, refused,
                                                       monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    check = lambda p: precision.check_precision(p, backend=backend, environ=env)  # noqa: E731
    check("float32")                                          # never refused
    if refused:
        with pytest.raises(ConfigError, match=r"precision.*avx512_bf16 or amx_bf16.*"
                                              + precision.FORCE_ENV):
            check("bf16")
    else:
        check("bf16")


def test_create_model_refuses_bf16_on_a_cpu_without_it(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("the refusal applies to the CPU backend")
    monkeypatch.setattr(precision, "cpu_flags", lambda: NO_BF16)
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    cfg = preset("test", precision="bf16")
    with pytest.raises(ConfigError, match="avx512_bf16"):
        create_model(cfg, jax.random.key(0))
    create_model(preset("test"), jax.random.key(0))           # float32 is always fine
    monkeypatch.setenv(precision.FORCE_ENV, "1")
    create_model(cfg, jax.random.key(0))


def test_cpu_flags_parsed_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                 "processor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_flags(str(f)) == {"fpu", "avx2", "avx512_bf16"}
    assert precision.cpu_flags(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("cls", ["test", "llama-test"])
def test_precision_field_validated_and_parsed_from_the_command_line(cls):
    from rlhf_jax import cli
    from rlhf_jax.stages.pipeline import PipelineConfig

    assert preset(cls).precision == "float32"
    with pytest.raises(ConfigError, match="precision"):
        preset(cls, precision="fp16")
    if cls == "test":
        _, cfg = cli.parse(PipelineConfig, ["--out", "x", "--pretrain.model.precision", "bf16"])
        assert cfg.pretrain.model.precision == "bf16"
