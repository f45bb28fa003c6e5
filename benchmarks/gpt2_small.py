"""``run.py --workload gpt2-small``: the real-size workload of issue #26, both precisions.

GPT-2 small (the ``gpt2`` model preset: 124M parameters, 12 layers, d_model 768, 12 heads, GPT-2's
50,257-token vocabulary, context 1024), random init, synthetic tokens, through the same library
code paths as the reference workload (``run.bench_sft``, ``run.bench_gen``, ``run.bench_ppo``):

  sft   8 × 128 tokens, AdamW, clip 1.0                                        -> tokens/s
  gen   32 prompts × 64 → 48 new tokens, T = 1, KV cache                         -> new tokens/s
  ppo   one iteration of ``rl.ppo.make_iteration``: 32 rollouts, prompt 64, response 48 (all
        generated), separate policy / reference / value / reward models, 1 epoch × 4
        minibatches of 8, π_old from a policy forward pass (``rescore_policy=True``, the
        library default, which bf16 requires); one iteration timed right after the
        ahead-of-time compile, no phase split (``gen`` times the sampler alone) -> s/iteration

Every (workload, precision) pair runs in its own process (``run.py --workload gpt2-small --only W
--precision P``), so ``peak_rss_mb`` is that workload's own peak resident set; the pairs run
float32, bf16, float32, bf16 ... so a change of load hits both precisions. Each row records its
precision, the CPU model and SIMD flags, the same-process matmul peak *of its precision*
(1024³, f32 × f32 → f32 for float32, bf16 × bf16 → f32 for bf16) and the MFU against it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = ("sft", "gen", "ppo")
PRECISIONS = ("float32", "bf16")
RSS_LIMIT_MB = 16 * 1024
# (warm-up, timed); PPO: one iteration after the ahead-of-time compile (no warm-up iteration)
ITERS = {"sft": (1, 3), "gen": (1, 3), "ppo": (0, 1)}
ITERS_QUICK = {"sft": (1, 1), "gen": (1, 1), "ppo": (0, 1)}


def shapes(bench, tiny: bool):
    """The gpt2-small shapes (``tiny``: the ``test`` preset at the reference's tiny shapes)."""
    if tiny:
        return dataclasses.replace(bench.TINY, ppo_rescore=True)
    return dataclasses.replace(
        bench.REFERENCE, model="gpt2", sft_batch=8, sft_len=128, gen_prompts=32,
        gen_prompt_len=64, gen_new=48, ppo_prompts=32, ppo_prompt_len=64, ppo_new=48,
        ppo_epochs=1, ppo_minibatches=4, ppo_rescore=True)


def measure(bench, workload: str, precision: str, *, tiny: bool, quick: bool) -> dict:
    """One row, in this process: ``workload`` at ``precision`` (``bench`` is ``run.py``)."""
    import jax

    from rlhf_jax.parallel import make_mesh

    sh = dataclasses.replace(shapes(bench, tiny), precision=precision)
    iters = (ITERS_QUICK if quick or tiny else ITERS)[workload]
    mesh = make_mesh(jax.devices()[:1])
    n_mm = 256 if tiny else 1024
    peak = bench.matmul_peak_flops(n_mm, reps=5 if quick else 10, precision=precision)
    if workload == "sft":
        r = bench.bench_sft(sh, iters, peak, mesh)
    elif workload == "gen":
        bandwidth = bench.sibling("roofline").read_bandwidth((64 if tiny else 512) << 20,
                                                             reps=3 if quick else 8)
        r = bench.bench_gen(sh, iters, mesh)
        r["roofline"] = bench.gen_roofline(sh, r["median_step_s"], peak, bandwidth)
    else:
        r = bench.bench_ppo(sh, iters, peak, mesh, critic="separate", phases=False)
    return {"workload": workload, "precision": precision, **r,
            "matmul_peak_gflops": round(peak / 1e9, 1),
            "matmul_peak_kind": "bf16 x bf16 -> f32" if precision == "bf16" else "f32 x f32 -> f32"}


def run_all(precisions, workloads, *, tiny: bool, quick: bool, runner=None) -> dict:
    """Every (workload, precision) pair in its own process, precisions alternating; ``runner``
    (tests) replaces the subprocess call: ``runner(workload, precision) -> row``."""
    runner = runner or (lambda w, p: _subprocess_row(w, p, tiny=tiny, quick=quick))
    rows, t0 = [], time.perf_counter()
    for w in workloads:
        for p in precisions:
            print(f"[gpt2-small] {w} {p} ...", file=sys.stderr, flush=True)
            rows.append(runner(w, p))
            print(f"[gpt2-small] {w} {p}: {json.dumps(rows[-1])[:400]} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    over = [f"{r['workload']}/{r['precision']}" for r in rows
            if r.get("peak_rss_mb", 0) > RSS_LIMIT_MB]
    return {"rows": rows, "table": table(rows), "rss_limit_mb": RSS_LIMIT_MB,
            "rss_over_limit": over, "wall_s": round(time.perf_counter() - t0, 1)}


def table(rows) -> dict:
    """``{workload: {precision: headline}}``: tokens/s or s/iteration, compile s, RSS MB, MFU."""
    keys = {"sft": "tokens_per_s", "gen": "new_tokens_per_s", "ppo": "iter_s"}
    out: dict = {}
    for r in rows:
        if "error" in r:
            out.setdefault(r["workload"], {})[r["precision"]] = {"error": r["error"][-300:]}
            continue
        out.setdefault(r["workload"], {})[r["precision"]] = {
            keys[r["workload"]]: r[keys[r["workload"]]], "compile_s": r["compile_s"],
            "peak_rss_mb": r["peak_rss_mb"], "mfu": r.get("mfu"),
            **({"of_bound": r["roofline"]["of_bound"]} if "roofline" in r else {})}
    return out


def _subprocess_row(workload: str, precision: str, *, tiny: bool, quick: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).with_name("run.py")), "--workload", "gpt2-small",
           "--only", workload, "--precision", precision] + ["--tiny"] * tiny + ["--quick"] * quick
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    sys.stderr.write(p.stderr[-2000:] if p.returncode else "")
    if p.returncode != 0:
        return {"workload": workload, "precision": precision, "error": p.stderr[-1500:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    return {**res["row"], "peak_rss_mb": res["peak_rss_mb"]}
