"""Smoke tests of the benchmark scripts: tiny shapes, no timed assertions, no TRL needed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while being built
    spec.loader.exec_module(mod)
    return mod


# a canned trl_baseline.py result line (shape of its real output, made-up round numbers)
TRL_LINE = {
    "bench": "trl_baseline", "quick": False,
    "sft_trl": {"tokens_per_s": 6000.0}, "rm_trl": {"pairs_per_s": 30.0},
    "dpo_trl": {"pairs_per_s": 20.0},
    "ppo_trl": {"median_iter_s": 5.0, "gen_s": 0.3, "rollout_scoring_s": 0.5,
                "train_and_rest_s": 4.2},
    "gen": {"new_tokens_per_s": 7000.0},
    "sft_trl_bf16": {"tokens_per_s": 9000.0}, "rm_trl_bf16": {"pairs_per_s": 25.0},
    "dpo_trl_bf16": {"error": "TypeError: something"},
    "ppo_trl_bf16": {"median_iter_s": 4.0, "gen_s": 0.3, "rollout_scoring_s": 0.4,
                     "train_and_rest_s": 3.3},
    "gen_bf16": {"new_tokens_per_s": 6000.0},
}
OURS_LINE = {
    "precision": "float32",
    "sft_tokens_per_s": 12000.0, "rm_pairs_per_s": 60.0, "dpo_pairs_per_s": 40.0,
    "dpo_pairs_per_s_precomputed": 50.0, "gen_new_tokens_per_s": 14000.0, "ppo_iter_s": 2.5,
    "ppo_phases_s": {"gen_s": 0.15, "scoring_s": 0.25, "update_s": 2.1},
    "ppo_iter_s_shared_value": 1.25, "mfu": {"sft": 0.5}, "matmul_peak_gflops": 480.0,
    "compile_s": {"sft": 1.0}, "peak_rss_mb": 900.0,
    "gen_of_bound": {"bandwidth": 0.1, "compute": 0.4, "roofline": 0.4}, "read_bandwidth_gbs": 30.0,
}


def test_run_py_tiny_reference_prints_one_json_line():
    # the persistent compilation cache stays on (a rerun compiles almost nothing): ~50 s of CPU
    # on a fresh cache, most of it compiling the tiny PPO iteration and its phases
    env = {k: v for k, v in os.environ.items() if k != "RLHF_JAX_NO_REEXEC"}
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--workload", "reference",
         "--tiny", "--quick", "--only", "sft,rm,gen,ppo"],
        env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stdout
    res = json.loads(lines[0])
    # the process re-executed itself under the experiments' allocator settings
    assert res["allocator_env"] == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                                    "MALLOC_TRIM_THRESHOLD_": "17179869184"}
    assert res["model"]["d_model"] == 32 and res["dtype"] == "float32"
    # the peak MFU is taken against is a matmul of the run's own precision
    assert res["precision"] == res["matmul_peak_precision"] == "float32"
    for key in ("sft_tokens_per_s", "rm_pairs_per_s", "gen_new_tokens_per_s", "ppo_iter_s",
                "matmul_peak_gflops", "peak_rss_mb"):
        assert res[key] > 0, key
    for w in ("sft", "rm", "gen", "ppo"):
        assert res["compile_s"][w] > 0, w
    for w in ("sft", "rm", "ppo"):
        assert 0 < res["mfu"][w] < 10, w   # a ratio; > 1 only if the peak was mis-measured
    assert set(res["ppo_phases_s"]) == {"gen_s", "scoring_s", "update_s"}
    assert res["ppo_phases_s"]["gen_s"] > 0
    assert "ppo_iter_s_shared_value" not in res          # --only honoured
    assert (res["detail"]["sft"]["n_timed"], res["detail"]["ppo"]["n_timed"]) == (3, 2)
    # generation against its bounds, at the rates measured in the same run
    rl = res["detail"]["gen"]["roofline"]
    assert rl["read_bandwidth_gbs"] == res["read_bandwidth_gbs"] > 0
    assert rl["matmul_peak_gflops"] == max(res["matmul_peak_gflops_start_end"])
    assert res["gen_of_bound"] == rl["of_bound"]
    measured = res["detail"]["gen"]["median_step_s"]
    for k in ("bandwidth", "compute", "roofline"):
        assert abs(rl["of_bound"][k] - rl[f"{k}_s"] / measured) < 2e-3 + 0.01 * rl["of_bound"][k]


def test_reference_shapes_match_the_trl_baseline():
    run = _load("run")
    from rlhf_jax.models.config import preset
    cfg = preset(run.REFERENCE.model)
    assert (cfg.vocab_size, cfg.max_len, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.dropout) == (
        512, 256, 256, 4, 4, 0.0)
    r = run.REFERENCE
    assert (r.sft_batch, r.sft_len, r.rm_pairs, r.rm_len) == (16, 128, 16, 128)
    assert (r.dpo_pairs, r.dpo_prompt, r.dpo_completion) == (16, 32, 96)
    assert (r.gen_prompts, r.gen_prompt_len, r.gen_new) == (64, 32, 32)
    assert (r.ppo_prompts, r.ppo_prompt_len, r.ppo_new, r.ppo_epochs, r.ppo_minibatches) == (
        64, 32, 32, 4, 4)
    o = run.optim_config()
    assert (o.clip_norm, o.b2, o.weight_decay, o.warmup_steps) == (1.0, 0.999, 0.0, 0)


def test_flops_formula_and_bench_param_count():
    run = _load("run")
    import jax
    from rlhf_jax.models import create_model
    from rlhf_jax.models.config import preset
    from rlhf_jax.models.functional import count_params

    # 3.36M parameters as trl_baseline.py's GPT2LMHeadModel (tied embeddings)
    n = count_params(jax.eval_shape(lambda: create_model(preset("bench"), jax.random.key(0))[1]))
    assert abs(n - 3.36e6) < 0.01e6, n
    assert run.flops_per_token(10, 2, 3, 4) == 6 * 10 + 12 * 2 * 3 * 4


def _param_count_by_hand(v, d, layers, ff, max_len):
    """GPT-2's parameters from its architecture (tied embeddings): per block QKV, output
    projection, MLP up and down (kernels and biases) and two LayerNorms; then wte, wpe, ln_f."""
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
    return layers * block + v * d + max_len * d + 2 * d


def _xla_flops(model, params, b, p, n):
    """XLA's own FLOP counts (``cost_analysis``) of the prefill and of the last decoding step,
    compiled from parameter shapes as ``sampling.sample`` calls the model."""
    import jax
    import jax.numpy as jnp
    from rlhf_jax.models import init_cache

    s = p + n - 1
    kw = dict(kv_mask=jnp.ones((b, s), bool))

    def flops(f, tokens):
        cost = jax.jit(f).lower(params, jax.ShapeDtypeStruct(tokens, jnp.int32)).compile()
        cost = cost.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    prefill = flops(lambda prm, x: model.apply(
        prm, x, positions=jnp.zeros((b, p), jnp.int32), cache=init_cache(model.cfg, b, s),
        cache_index=0, output_positions=slice(p - 1, None), **kw).logits, (b, p))
    last = flops(lambda prm, x: model.apply(
        prm, x, positions=jnp.zeros((b, 1), jnp.int32), cache=init_cache(model.cfg, b, s),
        cache_index=s - 1, **kw).logits, (b, 1))
    return prefill, last


def test_generation_roofline_hand_worked():
    rf = _load("roofline")
    import jax
    from rlhf_jax.models import create_model
    from rlhf_jax.models.config import preset

    cfg = preset("test")            # vocab 64, d 32, 2 layers, 2 heads of 16, context 64
    shapes = jax.eval_shape(lambda: create_model(cfg, jax.random.key(0))[1])
    read = _param_count_by_hand(64, 32, 2, 128, 64) - 64 * 32        # wpe is gathered, not read
    assert rf.weights_read(shapes, cfg) == read
    assert rf.layer_weights(shapes, cfg) == (_param_count_by_hand(64, 32, 2, 128, 64)
                                             - 64 * 32 - 64 * 32 - 2 * 32) // 2
    b, p, n = 3, 5, 4
    w = rf.generation_work(shapes, cfg, batch=b, prompt_len=p, new_tokens=n)
    slot = 2 * 2 * 2 * 16 * 4                                        # K and V, 2 layers, float32
    assert (w["weight_bytes"], w["kv_bytes_per_token"]) == (4 * read, slot)
    assert w["prefill"]["bytes"] == 4 * read + b * p * slot
    # decoding steps 1..3 read the cache's 6, 7, 8 valid slots (the new token's own included)
    assert w["steps"]["bytes"] == [4 * read + b * c * slot for c in (6, 7, 8)]

    # the FLOPs against XLA's own count of the calls sampling.sample makes (a larger model, where
    # the matmuls are nearly all of it): the least work, a little below what XLA runs (GPT-2's
    # last block projects queries at every prompt position, the layer norms and softmax count
    # too, XLA's scores are not causal), never above it
    big = preset("bench")
    model, _ = create_model(big, jax.random.key(0))
    bshapes = jax.eval_shape(lambda: create_model(big, jax.random.key(0))[1])
    xla_prefill, xla_last = _xla_flops(model, bshapes, 2, 32, 4)
    bench_work = rf.generation_work(bshapes, big, batch=2, prompt_len=32, new_tokens=4)
    assert 0.9 < bench_work["prefill"]["flops"] / xla_prefill <= 1.0, xla_prefill
    assert 0.9 < bench_work["steps"]["flops"][-1] / xla_last <= 1.0, xla_last

    # bounds at made-up rates: phase by phase, the slower of bytes and FLOPs
    bw, peak = 1e6, 1e9
    bd = rf.bounds(w, tokens=b * n, peak_flops=peak, bandwidth=bw)
    phases = [(w["prefill"]["bytes"], w["prefill"]["flops"]),
              *zip(w["steps"]["bytes"], w["steps"]["flops"])]
    roof = sum(max(x / bw, f / peak) for x, f in phases)
    assert abs(bd["roofline_s"] - roof) < 1e-9 * roof
    assert abs(bd["bandwidth_new_tokens_per_s"] * sum(x for x, _ in phases) / bw - b * n) < 1e-6
    assert bd["roofline_s"] >= max(bd["bandwidth_s"], bd["compute_s"])
    r = rf.report(shapes, cfg, batch=b, prompt_len=p, new_tokens=n, measured_s=2 * roof,
                  peak_flops=peak, bandwidth=bw)
    assert r["of_bound"]["roofline"] == 0.5

    # bf16 reads half the bytes; an untied model reads its output matrix, not its input table;
    # grouped-query attention caches its 2 key/value heads of 8, not the 4 query heads
    w16 = rf.generation_work(shapes, cfg.replace(precision="bf16"), batch=b, prompt_len=p,
                             new_tokens=n)
    assert w16["prefill"]["bytes"] * 2 == w["prefill"]["bytes"]
    assert w16["prefill"]["flops"] == w["prefill"]["flops"]
    lcfg = preset("llama-test")
    lshapes = jax.eval_shape(lambda: create_model(lcfg, jax.random.key(0))[1])
    total = sum(x.size for x in jax.tree.leaves(lshapes))
    assert rf.weights_read(lshapes, lcfg) == total - lcfg.vocab_size * lcfg.d_model
    lw = rf.generation_work(lshapes, lcfg, batch=1, prompt_len=3, new_tokens=2)
    assert lw["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 4


def test_side_by_side_table_from_canned_lines(tmp_path):
    sbs = _load("side_by_side")
    trl = tmp_path / "trl.json"
    ours = tmp_path / "ours.json"
    t2 = json.loads(json.dumps(TRL_LINE))
    t2["sft_trl"]["tokens_per_s"] = 4000.0
    t2["sft_trl_bf16"]["tokens_per_s"] = 11000.0
    trl.write_text("progress noise\n" + json.dumps(TRL_LINE) + "\n" + json.dumps(t2) + "\n")
    o2 = dict(OURS_LINE, sft_tokens_per_s=10000.0)
    b1 = dict(OURS_LINE, precision="bf16", sft_tokens_per_s=16000.0, ppo_iter_s=3.0,
              matmul_peak_gflops=900.0, mfu={"sft": 0.6})
    b2 = dict(b1, sft_tokens_per_s=9000.0)
    ours.write_text("\n".join(json.dumps(x) for x in (OURS_LINE, b1, o2, b2)) + "\n")
    res = sbs.main(["--pairs", "2", "--out", str(tmp_path / "out"), "--trl-json", str(trl),
                    "--ours-json", str(ours)])
    rows = {r["workload"]: r for r in res["rows"]}
    sft = rows["sft"]
    assert sft["ours_float32"] == {"median": 11000.0, "min": 10000.0, "max": 12000.0, "n": 2}
    assert sft["ours_bf16"]["median"] == 12500.0
    assert sft["trl_float32"]["median"] == 5000.0 and sft["trl_bf16"]["median"] == 10000.0
    # best vs best: our bf16 median (12,500) against TRL's bf16 median (10,000)
    assert (sft["best_ours"], sft["best_trl"]) == ("bf16", "bf16")
    assert sft["ratio_best"] == pytest.approx(1.25)
    # per round, each side's fastest: max(12000, 16000) / max(6000, 9000) and
    # max(10000, 9000) / max(4000, 11000)
    assert sft["ratio_best_pairs"]["max"] == pytest.approx(16000 / 9000)
    assert sft["ratio_best_pairs"]["min"] == pytest.approx(10000 / 11000)
    assert sft["ratio_float32"] == pytest.approx(11000 / 5000)
    assert (sft["ratio_float32_pairs"]["min"], sft["ratio_float32_pairs"]["max"]) == (2.0, 2.5)
    assert sft["ratio_bf16"] == pytest.approx(12500 / 10000)
    # times: ratio = TRL / ours, the fastest being the smallest time
    ppo = rows["ppo iteration"]
    assert (ppo["best_ours"], ppo["best_trl"]) == ("float32", "bf16")
    assert ppo["ratio_best"] == pytest.approx(4.0 / 2.5)
    assert ppo["ratio_float32"] == pytest.approx(5.0 / 2.5)
    assert ppo["ratio_bf16"] == pytest.approx(4.0 / 3.0)
    assert rows["  ppo: updates"]["ratio_float32"] == pytest.approx(4.2 / 2.1)
    assert rows["ppo iteration, shared value trunk (ours)"]["ratio_float32"] == pytest.approx(4.0)
    assert rows["generation"]["ratio_float32"] == pytest.approx(2.0)
    # an error entry is no number: DPO's best is TRL f32
    dpo = rows["dpo"]
    assert dpo["trl_bf16"] is None and dpo["ratio_bf16"] is None and dpo["best_trl"] == "float32"
    md = (tmp_path / "out" / "side_by_side.md").read_text()
    assert ("| sft | tokens/s | 11,000 (10,000–12,000) | 12,500 (9,000–16,000) | "
            "5,000 (4,000–6,000) | 10,000 (9,000–11,000) | **1.25× (0.91–1.78)** [bf16 / bf16] | "
            "2.20× (2.00–2.50) | 1.25× (0.82–1.78) |") in md
    assert "bf16 sft MFU" in md and "float32 sft MFU" in md
    assert "generation against its bounds: 40.0 (40.0–40.0) % of the roofline bound, 10.0" in md
    saved = json.loads((tmp_path / "out" / "side_by_side.json").read_text())
    assert saved["pairs"] == 2 and len(saved["trl_runs"]) == 2
    assert len(saved["ours_runs"]["bf16"]) == 2


def test_trl_and_our_precisions_follow_the_cpus_bf16_instructions():
    sbs = _load("side_by_side")
    f32 = ["--only", sbs.TRL_F32_BENCHES]
    both = ["--only", sbs.TRL_F32_BENCHES + "," + sbs.TRL_BF16_BENCHES, "--bf16"]
    cmd = lambda args, mode, simd: sbs.trl_command("py", "trl.py", [], args, mode,  # noqa: E731
                                                   {"simd": simd})
    assert cmd("", "auto", "avx2 fma") == ["py", "trl.py", *f32]
    assert cmd("", "auto", "avx2 fma avx512f avx512_bf16") == ["py", "trl.py", *both]
    assert cmd("", "auto", "avx2 amx_bf16") == ["py", "trl.py", *both]
    assert cmd("", "yes", "avx2") == ["py", "trl.py", *both]
    assert cmd("", "no", "avx512_bf16") == ["py", "trl.py", *f32]
    assert cmd("--only sft_trl", "auto", "avx2") == ["py", "trl.py", "--only", "sft_trl"]
    # neither TRL's defaults with gradient checkpointing nor the bare PyTorch loops
    assert not any(b.endswith(("_defaults", "_torch"))
                   for b in (sbs.TRL_F32_BENCHES + "," + sbs.TRL_BF16_BENCHES).split(","))
    assert sbs.our_precisions("auto", {"simd": "avx2 fma"}) == ["float32"]
    assert sbs.our_precisions("auto", {"simd": "avx512f avx512_bf16"}) == ["float32", "bf16"]
    assert sbs.our_precisions("bf16", {"simd": "avx2"}) == ["bf16"]
    with pytest.raises(ValueError, match="fp16"):
        sbs.our_precisions("float32,fp16", {})


def test_last_json_line_skips_noise():
    sbs = _load("side_by_side")
    assert sbs.last_json_line('x\n{"a": 1}\n{broken\n') == {"a": 1}
    with pytest.raises(ValueError):
        sbs.last_json_line("no json here")


def test_gpt2_small_is_gpt2_small_at_the_issues_shapes():
    run, g = _load("run"), _load("gpt2_small")
    import jax
    from rlhf_jax.models import create_model
    from rlhf_jax.models.config import preset
    from rlhf_jax.models.functional import count_params

    sh = g.shapes(run, tiny=False)
    cfg = preset(sh.model)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads) == (50257, 768, 12, 12)
    assert cfg.max_len >= sh.ppo_prompt_len + sh.ppo_new == 112
    n = count_params(jax.eval_shape(lambda: create_model(cfg, jax.random.key(0))[1]))
    assert abs(n - 124.4e6) < 0.1e6, n                       # GPT-2 small, tied embeddings
    assert (sh.ppo_prompts, sh.ppo_prompt_len, sh.ppo_new, sh.ppo_rescore) == (32, 64, 48, True)
    assert sh.ppo_prompts % sh.ppo_minibatches == 0


def test_gpt2_small_alternates_precisions_and_flags_rss_over_16gb():
    g = _load("gpt2_small")
    calls = []
    heads = {"sft": "tokens_per_s", "gen": "new_tokens_per_s", "ppo": "iter_s"}

    def fake(w, p):
        calls.append((w, p))
        rss = 17000.0 if (w, p) == ("ppo", "bf16") else 900.0
        return {"workload": w, "precision": p, heads[w]: 2.0, "compile_s": 1.0,
                "peak_rss_mb": rss, "mfu": 0.5}

    res = g.run_all(["float32", "bf16"], list(g.WORKLOADS), tiny=True, quick=True, runner=fake)
    assert calls == [(w, p) for w in ("sft", "gen", "ppo") for p in ("float32", "bf16")]
    assert res["rss_over_limit"] == ["ppo/bf16"]
    assert res["table"]["ppo"]["bf16"] == {"iter_s": 2.0, "compile_s": 1.0, "peak_rss_mb": 17000.0,
                                           "mfu": 0.5}
    err = g.table([{"workload": "sft", "precision": "bf16", "error": "boom"}])
    assert err == {"sft": {"bf16": {"error": "boom"}}}


def test_run_py_gpt2_small_tiny_row_in_process(capsys):
    # the in-process path a gpt2-small child runs: one workload, one precision, one JSON line
    run = _load("run")
    res = run.main(["--workload", "gpt2-small", "--tiny", "--quick", "--only", "sft",
                    "--precision", "float32"])
    row = res["row"]
    assert (row["workload"], row["precision"], row["n_timed"]) == ("sft", "float32", 1)
    assert row["tokens_per_s"] > 0 and row["compile_s"] > 0 and res["peak_rss_mb"] > 0
    assert row["matmul_peak_kind"] == "f32 x f32 -> f32" and row["matmul_peak_gflops"] > 0
    assert row["cpu"]["cpu_count"] >= 1 and "simd_flags" in row["cpu"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["row"] == row
    with pytest.raises(SystemExit):
        run.main(["--workload", "gpt2-small", "--only", "rm"])


def test_matmul_routes_reads_the_route_from_hlo_and_summarises_rounds():
    mr = _load("matmul_routes")
    hlo = ('%f = f32[8,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, backend_config='
           '{"fusion_backend_config":{"kind":"__ynn_fusion"}}\n'
           '  %d = f32[8,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}\n'
           '%e = f32[8,8] custom-call(%a), custom_call_target="__onednn$matmul"\n')
    assert mr.hlo_route(hlo) == {"custom_calls": ["__onednn$matmul"],
                                 "fusion_kinds": ["__ynn_fusion"], "plain_dots": 1}
    route = {"custom_calls": [], "fusion_kinds": [], "plain_dots": 1}
    runs = [{"xla_flags": "--x", "warnings": ["W deprecated"],
             "results": {"cube_1024/f32": {"gflops": g, "route": route}}} for g in (10.0, 30.0, 20.0)]
    s = mr.summarise(runs + [{"error": "crash"}])
    assert s["results"]["cube_1024/f32"]["gflops"] == 20.0
    assert s["results"]["cube_1024/f32"]["rounds_min_max"] == [10.0, 30.0]
    assert (s["rounds"], s["warnings"]) == (3, ["W deprecated"])
    assert mr.summarise([{"error": "Unknown flag", "warnings": []}])["error"] == "Unknown flag"
    # the dot_general of every layout computes x·w of the shape it names
    import numpy as np
    import jax
    for name in ("ref_mlp_wgrad", "ref_mlp_dgrad", "ref_attn_scores"):
        b, m, k, n, _ = mr.SHAPES[name]
        x, y = mr._operands((b, 4, 3, 5, mr.SHAPES[name][4]), "f32", jax.random.key(0))
        out = np.asarray(mr._matmul_fn(mr.SHAPES[name], "f32")(x, y))
        x, y = np.asarray(x), np.asarray(y)
        lay = mr.SHAPES[name][4]
        ref = {"nn": lambda: x @ y, "tn": lambda: np.swapaxes(x, -1, -2) @ y,
               "nt": lambda: x @ np.swapaxes(y, -1, -2)}[lay]()
        assert out.shape == ((b,) if b > 1 else ()) + (4, 5)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_record_reads_model_and_simd_flags(tmp_path):
    from rlhf_jax import launch

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                    "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n")
    rec = launch.cpu_record(str(info))
    assert rec["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert rec["simd_flags"] == ["amx_bf16", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512f",
                                 "fma"]
    assert launch.cpu_record(str(tmp_path / "missing")) == {
        "model": "", "simd_flags": [], "cpu_count": rec["cpu_count"]}
