#!/usr/bin/env python
"""GFLOP/s of XLA:CPU's matmul routes: which ``XLA_FLAGS`` reach the CPU's bf16 / AVX-512 units.

Every route is a set of ``XLA_FLAGS``; XLA reads them once, when JAX starts its CPU backend, so
each route runs in a fresh child process (``--child``). The parent runs the routes in rounds —
route 1, route 2, ..., route 1, route 2, ... — so a change of load on a shared machine hits every
route alike, and reports per route the median over rounds of each child's median (and the
min–max of those medians).

Each child times, for every shape and every dtype case below, a jitted matmul (``block_until_ready``
before each clock read; repeated until ``--min-time`` seconds and at least 3 calls, after one
warm-up), and reads the optimised HLO for what XLA made of the dot: a plain ``dot`` (XLA's own
emitter / Eigen), a library fusion (``__xnn_fusion``, ``__ynn_fusion``, ``__onednn_fusion``) or a
oneDNN custom call. A route whose flags XLA rejects, or that it warns about, is recorded with the
message.

dtype cases: ``f32`` (f32 × f32 → f32), ``bf16_f32`` (bf16 × bf16 → f32 via
``preferred_element_type``; what ``precision="bf16"`` models run), ``bf16`` (bf16 × bf16 → bf16),
``f32_prec_bf16`` (f32 inputs under ``jax.default_matmul_precision("bfloat16")``).

    python benchmarks/matmul_routes.py --out /work/runs/routes.json        # all routes, 3 rounds
    python benchmarks/matmul_routes.py --routes default,xnn_dot --rounds 1 --quick
    python benchmarks/matmul_routes.py --steps --routes default,ynn_off   # SFT step per route

``--steps`` times one training step of the reference workload instead (``run.py --workload
reference --only sft``, both precisions) under each route, in rounds, each in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlhf_jax.launch import cpu_record  # noqa: E402  (no JAX import: the child sets XLA_FLAGS first)

# route name -> XLA_FLAGS (flag names as registered in jaxlib 0.10.2's xla/debug_options_flags.cc).
# In 0.10.2 the default sends every dot XLA does not fuse to YNNPACK (an ``__ynn_fusion``);
# ``--xla_cpu_experimental_ynn_fusion_type=`` (empty list) turns that off, leaving XLA's own dot
# thunk (Eigen), which the XNNPACK / oneDNN flags below may then claim.
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
ROUTES = {
    "default": "",
    "thunk_runtime_false": "--xla_cpu_use_thunk_runtime=false",     # deprecated: warns, no-op
    "ynn_off": YNN_OFF,
    "ynn_dot_fusions": "--xla_cpu_experimental_ynn_fusion_type=+dot",
    "ynn_off_xnnpack": f"{YNN_OFF} --xla_cpu_use_xnnpack=true",
    "ynn_off_xnn_dot": f"{YNN_OFF} --xla_cpu_experimental_xnn_fusion_type=dot,individual_dot",
    "ynn_off_onednn": f"{YNN_OFF} --xla_cpu_use_onednn=true",
    "ynn_off_onednn_custom_call": f"{YNN_OFF} --xla_cpu_experimental_onednn_custom_call=true",
    "ynn_off_onednn_fusion": f"{YNN_OFF} --xla_cpu_experimental_onednn_fusion_type=dot,individual_dot",
    "max_isa_avx512": "--xla_cpu_max_isa=AVX512",                  # no avx512_bf16 in codegen
}

# name -> (batch, M, K, N, layout); FLOPs = 2·batch·M·K·N. Layouts: "nn" = x[M,K]·w[K,N];
# "tn" = x[K,M]ᵀ·dy[K,N] (a weight gradient: contracting the leading axis of both operands);
# "nt" = dy[M,N]·w[K,N]ᵀ read as [M,K] (an input gradient). Reference workload: d 256, B·T 2048,
# vocab 512; gpt2-small: d 768, vocab 50,257, B·T 512.
SHAPES = {
    "cube_1024": (1, 1024, 1024, 1024, "nn"),
    "ref_mlp_up": (1, 2048, 256, 1024, "nn"),
    "ref_mlp_wgrad": (1, 256, 2048, 1024, "tn"),
    "ref_mlp_wgrad_nn": (1, 256, 2048, 1024, "nn"),    # the same with xᵀ materialised
    "ref_mlp_dgrad": (1, 2048, 1024, 256, "nt"),
    "ref_lm_head": (1, 2048, 256, 512, "nn"),
    "ref_attn_scores": (64, 128, 64, 128, "nn"),
    "gpt2_mlp_up": (1, 512, 768, 3072, "nn"),
    "gpt2_mlp_wgrad": (1, 768, 512, 3072, "tn"),
    "gpt2_mlp_wgrad_nn": (1, 768, 512, 3072, "nn"),
    "gpt2_lm_head": (1, 512, 768, 50257, "nn"),
}
QUICK_SHAPES = ("cube_1024", "ref_mlp_up", "gpt2_mlp_up")
CASES = ("f32", "bf16_f32", "bf16", "f32_prec_bf16")
DEFAULT_CASES = ("f32", "bf16_f32", "bf16")
WARN_RE = re.compile(r"(no longer supported|deprecat|unknown flag|warning)", re.I)


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ----------------------------------------------------------------------------- child
def hlo_route(hlo: str) -> dict:
    """What XLA made of the dots in an optimised HLO module: custom-call targets, library fusion
    kinds and the number of plain ``dot`` instructions left."""
    return {"custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))),
            "fusion_kinds": sorted(set(re.findall(r'"kind":"(__\w+)"', hlo))),
            "plain_dots": len(re.findall(r"= \S+ dot\(", hlo))}


def _operands(shape, case, key):
    import jax
    import jax.numpy as jnp

    b, m, k, n, layout = shape
    lhs = {"nn": (m, k), "tn": (k, m), "nt": (m, k)}[layout]
    rhs = {"nn": (k, n), "tn": (k, n), "nt": (n, k)}[layout]
    if b > 1:
        lhs, rhs = (b, *lhs), (b, *rhs)
    dt = jnp.float32 if case.startswith("f32") else jnp.bfloat16
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, lhs, dt), jax.random.normal(k2, rhs, dt)


def _matmul_fn(shape, case):
    import jax
    import jax.numpy as jnp
    from jax import lax

    b, _, _, _, layout = shape
    bd = ((0,), (0,)) if b > 1 else ((), ())
    o = 1 if b > 1 else 0
    contract = {"nn": ((o + 1,), (o,)), "tn": ((o,), (o,)), "nt": ((o + 1,), (o + 1,))}[layout]
    pet = jnp.float32 if case == "bf16_f32" else None

    def f(x, y):
        return lax.dot_general(x, y, (contract, bd), preferred_element_type=pet)

    if case == "f32_prec_bf16":
        def g(x, y):
            with jax.default_matmul_precision("bfloat16"):
                return f(x, y)
        return jax.jit(g)
    return jax.jit(f)


def time_call(fn, args, min_time: float, min_reps: int = 3) -> list[float]:
    import jax

    jax.block_until_ready(fn(*args))                       # warm-up
    times, total = [], 0.0
    while len(times) < min_reps or total < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return times


def child(shapes, cases, min_time: float) -> dict:
    import jax

    out = {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": {}}
    key = jax.random.key(0)
    for sname in shapes:
        shape = SHAPES[sname]
        b, m, k, n, _ = shape
        flops = 2.0 * b * m * k * n
        for case in cases:
            fn = _matmul_fn(shape, case)
            args = _operands(shape, case, key)
            compiled = fn.lower(*args).compile()
            times = time_call(compiled, args, min_time)
            med = statistics.median(times)
            out["results"][f"{sname}/{case}"] = {
                "gflops": round(flops / med / 1e9, 1),
                "gflops_min_max": [round(flops / max(times) / 1e9, 1),
                                   round(flops / min(times) / 1e9, 1)],
                "n": len(times), "route": hlo_route(compiled.as_text())}
    return out


# ----------------------------------------------------------------------------- parent
def run_child(route: str, shapes, cases, min_time: float) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {ROUTES[route]}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, __file__, "--child", "--shapes", ",".join(shapes), "--cases",
           ",".join(cases), "--min-time", str(min_time)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    warnings = sorted({ln.strip()[-240:] for ln in p.stderr.splitlines() if WARN_RE.search(ln)})
    if p.returncode != 0:
        return {"error": p.stderr.strip()[-1500:], "returncode": p.returncode,
                "warnings": warnings}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["warnings"] = warnings
    return res


def summarise(runs: list[dict]) -> dict:
    """Per shape/case: median over rounds of the children's medians, their min–max, the route."""
    ok = [r for r in runs if "results" in r]
    if not ok:
        return {"error": runs[0].get("error", "no result"), "warnings": runs[0].get("warnings")}
    table = {}
    for key in ok[0]["results"]:
        vals = [r["results"][key]["gflops"] for r in ok]
        table[key] = {"gflops": round(statistics.median(vals), 1),
                      "rounds_min_max": [min(vals), max(vals)],
                      "route": ok[0]["results"][key]["route"]}
    return {"results": table, "warnings": ok[0]["warnings"], "rounds": len(ok),
            "xla_flags": ok[0]["xla_flags"]}


def run_step_child(route: str, precision: str, quick: bool) -> dict:
    """``run.py --workload reference --only sft --precision P`` under ``route``'s XLA_FLAGS."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {ROUTES[route]}".strip()
    cmd = [sys.executable, str(Path(__file__).with_name("run.py")), "--workload", "reference",
           "--only", "sft", "--precision", precision] + ["--quick"] * quick
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        return {"error": p.stderr.strip()[-1500:]}
    d = json.loads(p.stdout.strip().splitlines()[-1])["detail"]["sft"]
    return {k: d[k] for k in ("median_step_s", "min_step_s", "max_step_s", "tokens_per_s",
                              "compile_s", "other_cpu_load")}


def steps(routes, rounds: int, quick: bool) -> dict:
    """SFT step time of the reference workload per route and precision, routes alternating."""
    runs = {(r, p): [] for r in routes for p in ("float32", "bf16")}
    for i in range(rounds):
        for (r, p), out in runs.items():
            out.append(run_step_child(r, p, quick))
            print(f"[routes] steps round {i + 1}/{rounds} {r} {p}: {out[-1]} (load {load_avg()})",
                  file=sys.stderr, flush=True)
    table = {}
    for (r, p), out in runs.items():
        med = [o["median_step_s"] for o in out if "median_step_s" in o]
        table.setdefault(r, {})[p] = {
            "median_step_s": round(statistics.median(med), 4) if med else None,
            "rounds_min_max": [min(med), max(med)] if med else None, "runs": out}
    return table


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routes", default=",".join(ROUTES), help="comma list of " + ",".join(ROUTES))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma list of " + ",".join(CASES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per case")
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, 1 round")
    ap.add_argument("--out", default="", help="write the JSON here too")
    ap.add_argument("--steps", action="store_true",
                    help="time the reference SFT step per route instead of bare matmuls")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    shapes = list(QUICK_SHAPES) if a.quick else [s for s in a.shapes.split(",") if s]
    cases = [c for c in a.cases.split(",") if c]
    if a.child:
        res = child(shapes, cases, a.min_time)
        print(json.dumps(res), flush=True)
        return res
    routes = [r for r in a.routes.split(",") if r]
    bad = [r for r in routes + shapes if r not in ROUTES and r not in SHAPES]
    if bad:
        ap.error(f"unknown route(s)/shape(s) {bad}")
    rounds = 1 if a.quick else a.rounds
    head = {"bench": "matmul_routes", "cpu": cpu_record(), "load_avg_start": load_avg(),
            "shapes": {s: SHAPES[s] for s in shapes}, "cases": cases, "rounds": rounds,
            "min_time_s": a.min_time, "nice": os.nice(0), "started": time.strftime("%FT%TZ", time.gmtime())}
    t0 = time.perf_counter()
    if a.steps:
        res = {**head, "bench": "matmul_routes --steps", "steps": steps(routes, a.rounds, a.quick),
               "load_avg_end": load_avg(), "wall_s": round(time.perf_counter() - t0, 1)}
        return _emit(res, a.out)
    runs: dict[str, list[dict]] = {r: [] for r in routes}
    for i in range(rounds):
        for r in routes:
            runs[r].append(run_child(r, shapes, cases, a.min_time))
            print(f"[routes] round {i + 1}/{rounds} {r}: "
                  f"{'error' if 'error' in runs[r][-1] else 'ok'} "
                  f"({time.perf_counter() - t0:.0f} s, load {load_avg()})", file=sys.stderr,
                  flush=True)
    res = {**head, "load_avg_end": load_avg(), "wall_s": round(time.perf_counter() - t0, 1),
           "routes": {r: {"flags": ROUTES[r], **summarise(runs[r])} for r in routes}}
    return _emit(res, a.out)


def _emit(res: dict, out: str) -> dict:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
