#!/usr/bin/env python
"""Where the time of one PPO iteration goes: a ``jax.profiler`` trace of the compiled iteration of
the reference workload (``benchmarks/run.py``'s PPO: 64 prompts × 32, 32 new tokens, separate RM,
value and reference models, 4 epochs × 4 minibatches), broken down per XLA op.

Per-op CPU events need ``--xla_cpu_enable_xprof_traceme=true`` (set here before JAX starts). The
trace's Perfetto JSON is read back and every executed op is

* attributed to the top-level loop of the iteration it runs in: the sampler's ``lax.scan`` (trip
  count = new tokens − 1), the PPO update scan (trip count = epochs × minibatches), the GAE
  reverse scan (trip count = new tokens), or "outside loops" (prefill, the scoring forward passes
  of reference / value / RM — the policy is scored from the sampler's logits, as TRL does —,
  rewards, whitening, diagnostics);
* classed as matmul when its fused computation contains a ``dot`` or ``convolution`` (XLA's
  YNNPACK/oneDNN matmul fusions included).

The sum of op durations is not the wall time (ops of a thunk run on several threads, and the
per-op events add overhead); shares are of the summed op time. The wall-time split into
generation / scoring / update from ``run.py`` (separately jitted pieces) is printed beside it.

    python benchmarks/profile.py --out runs/profile           # writes profile.json + the trace
    python benchmarks/profile.py --tiny                        # tiny shapes (smoke run)
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_enable_xprof_traceme=true").strip()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rlhf_jax import launch

    launch.reexec_with_allocator_env()

import jax  # noqa: E402

CONTROL = {"while", "conditional", "call"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\(.*?\)|\S+)\s+([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'known_trip_count":\{"n":"(\d+)"')


def parse_hlo(text: str) -> dict:
    """Instructions of an HLO module: name -> {op, comp (the computation holding it), calls,
    trip}; and computation -> its instructions."""
    instrs, comps, comp = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            comp = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comp = comp.split("(")[0]
            continue
        m = _INSTR.match(line)
        if not m or comp is None:
            continue
        name, op, rest = m.groups()
        calls = list(_CALLS.findall(rest))
        for c in _BRANCHES.findall(rest):
            calls += [x.strip().lstrip("%") for x in c.split(",") if x.strip()]
        trip = _TRIP.search(rest)
        instrs[name] = {"op": op, "comp": comp, "calls": calls,
                        "trip": int(trip.group(1)) if trip else None}
        comps[comp].append(name)
    return {"instrs": instrs, "comps": comps,
            "entry": next((c for c in comps if c.startswith("main")), None)}


def has_matmul(hlo: dict, name: str, _seen=None) -> bool:
    ins = hlo["instrs"].get(name)
    if ins is None:
        return "dot" in name or "conv" in name or "gemm" in name or "matmul" in name
    if ins["op"] in ("dot", "convolution"):
        return True
    seen = _seen if _seen is not None else set()
    for c in ins["calls"]:
        if c in seen:
            continue
        seen.add(c)
        if any(has_matmul(hlo, i, seen) for i in hlo["comps"].get(c, [])):
            return True
    return False


def top_level_region(hlo: dict, name: str, entry_comp: str) -> str | None:
    """The top-level while instruction (of the entry computation or a call from it) that ``name``
    runs under, or None when it runs outside every loop."""
    caller = {}   # computation -> the instruction calling it
    for n, ins in hlo["instrs"].items():
        for c in ins["calls"]:
            caller.setdefault(c, n)
    outer = None
    comp = hlo["instrs"].get(name, {}).get("comp")
    cur = name
    while comp is not None and comp in caller:
        cur = caller[comp]
        if hlo["instrs"][cur]["op"] == "while":
            outer = cur
        comp = hlo["instrs"][cur]["comp"]
    return outer


def label_loop(trip: int | None, sh) -> str:
    if trip == sh.ppo_new - 1:
        return f"sampling scan ({trip} steps, KV cache)"
    if trip == sh.ppo_epochs * sh.ppo_minibatches:
        return f"PPO update scan ({trip} minibatch updates, policy + value fwd/bwd + Adam)"
    if trip == sh.ppo_new:
        return f"GAE reverse scan ({trip} steps)"
    return f"other loop (trip count {trip})"


def read_trace(trace_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"),
                             recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
    d = json.load(gzip.open(paths[-1]))
    return d["traceEvents"] if isinstance(d, dict) else d


def breakdown(events: list[dict], hlo: dict, module_hint: str, sh) -> dict:
    ops = collections.Counter()
    for e in events:
        a = e.get("args") or {}
        if e.get("ph") == "X" and "hlo_op" in a and module_hint in a.get("hlo_module", ""):
            ops[a["hlo_op"]] += e.get("dur", 0.0)
    regions, matmul, total = collections.Counter(), 0.0, 0.0
    region_mm = collections.Counter()
    per_op = []
    cache: dict = {}
    for name, dur in ops.items():
        ins = hlo["instrs"].get(name)
        if ins is not None and ins["op"] in CONTROL:
            continue                      # its body's ops are counted themselves
        mm = has_matmul(hlo, name)
        outer = cache.setdefault(name, top_level_region(hlo, name, hlo["entry"]))
        label = ("outside loops (prefill, scoring forwards, rewards, diagnostics)" if outer is None
                 else label_loop(hlo["instrs"][outer]["trip"], sh))
        regions[label] += dur
        total += dur
        if mm:
            matmul += dur
            region_mm[label] += dur
        per_op.append((dur, name, ins["op"] if ins else "?", mm, label))
    per_op.sort(reverse=True)
    return {
        "summed_op_ms": round(total / 1e3, 2),
        "matmul_share": round(matmul / max(total, 1e-9), 3),
        "regions": {k: {"ms": round(v / 1e3, 2), "share": round(v / max(total, 1e-9), 3),
                        "matmul_share_within": round(region_mm[k] / max(v, 1e-9), 3)}
                    for k, v in regions.most_common()},
        "top_ops": [{"op": n, "kind": k, "ms": round(d / 1e3, 3), "matmul": mm, "region": r}
                    for d, n, k, mm, r in per_op[:25]],
        "n_op_kinds": len(ops),
    }


def main(argv=None) -> dict:
    import run as bench   # benchmarks/run.py

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/profile")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run)")
    ap.add_argument("--critic", default="separate", choices=("separate", "shared"))
    ap.add_argument("--no-phases", action="store_true", help="skip the wall-time phase split")
    a = ap.parse_args(argv)
    from rlhf_jax import launch
    from rlhf_jax.parallel import make_mesh

    launch.enable_compilation_cache()
    sh = bench.TINY if a.tiny else bench.REFERENCE
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(jax.devices()[:1])
    models, hp, state, frozen = bench._ppo_setup(sh, a.critic, mesh)
    batches = bench._ppo_batches(sh, models.policy.cfg.vocab_size, mesh)
    keys = [jax.random.key(100 + i) for i in range(len(batches))]
    it = bench.ppo_iteration_fn(models, hp, sh, mesh)
    compiled, compile_s = bench.aot(it, state, frozen, batches[0], keys[0])
    hlo_text = compiled.as_text()
    (out / "ppo_iteration.hlo.txt").write_text(hlo_text)
    hlo = parse_hlo(hlo_text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    for i in range(2):                                     # warm-up
        state, _, _ = jax.block_until_ready(compiled(state, frozen, batches[i], keys[i]))
    trace_dir = out / "trace"
    t0 = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        state, _, _ = jax.block_until_ready(compiled(state, frozen, batches[2], keys[2]))
    traced_wall = time.perf_counter() - t0
    untraced = []
    for i in range(3):
        t1 = time.perf_counter()
        state, _, _ = jax.block_until_ready(compiled(state, frozen, batches[i % 4], keys[i % 4]))
        untraced.append(time.perf_counter() - t1)
    module = "jit_" if not hlo["entry"] else ""
    res = {"workload": "ppo", "critic": a.critic, "tiny": a.tiny, "compile_s": compile_s,
           "iter_s_untraced_median": round(statistics.median(untraced), 4),
           "iter_s_traced": round(traced_wall, 4),
           "xla_cost_analysis": {k: cost.get(k) for k in ("flops", "bytes accessed",
                                                          "transcendentals") if k in cost},
           **breakdown(read_trace(str(trace_dir)), hlo, module, sh)}
    if not a.no_phases:
        peak = bench.matmul_peak_flops(256 if a.tiny else 1024, reps=10)
        r = bench.bench_ppo(sh, (1, 3), peak, mesh, critic=a.critic, phases=True)
        res["wall_phases_s"] = {k: r.get(k) for k in ("iter_s", "gen_s", "scoring_s", "update_s")}
    (out / "profile.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
