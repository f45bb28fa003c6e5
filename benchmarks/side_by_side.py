#!/usr/bin/env python
"""Side-by-side benchmark: rlhf_jax (``benchmarks/run.py``) against Hugging Face TRL
(``../shared/bench/trl_baseline.py``) on the same reference workload, alternating the programs
(ours in each precision, then TRL; ours, TRL, …) for ``--pairs`` rounds under the same glibc
allocator settings.

Issue #26's comparison: each program's **fastest setting that the CPU runs natively** — float32,
plus bf16 where the CPU has bf16 instructions (``avx512_bf16`` / ``amx_bf16``): our
``--precision bf16`` (bf16 × bf16 → f32 matmuls) and TRL's bf16 autocast without gradient
checkpointing (``trl_baseline.py --bf16``, its ``*_bf16`` rows). Elsewhere both emulate bf16
(PyTorch's autocast ran 49-55× slower than its float32 on an AVX2 EPYC), so ``--precisions auto``
and ``--trl-bf16 auto`` measure float32 only there.

Writes ``side_by_side.json`` (every raw JSON line and the summary) and ``side_by_side.md`` (a table
of medians over the rounds, their spread min–max, and the ratios per workload: best vs best,
f32 vs f32 and bf16 vs bf16; ours/TRL for throughputs, TRL/ours for times — above 1 means rlhf_jax
is faster) into ``--out``, and prints the table.

    python benchmarks/side_by_side.py --pairs 5 --out runs/bench
    python benchmarks/side_by_side.py --pairs 1 --quick            # smoke run, both programs
    python benchmarks/side_by_side.py --trl-json trl.json --ours-json ours.json   # no TRL needed

TRL runs in its own virtual environment (``pip install torch==2.13.0 transformers trl==1.12.0``);
its interpreter and script are ``--trl-python`` / ``--trl-script`` (or ``RLHF_JAX_TRL_PYTHON`` /
``RLHF_JAX_TRL_SCRIPT``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRL_PYTHON = os.environ.get("RLHF_JAX_TRL_PYTHON", "/work/.venv-trl/bin/python")
def _default_trl_script() -> str:
    """``../shared/bench/trl_baseline.py`` beside the checkout (or beside its parent, for a git
    worktree one level down)."""
    for base in (ROOT.parent, ROOT.parent.parent):
        path = base / "shared" / "bench" / "trl_baseline.py"
        if path.exists():
            return str(path)
    return str(ROOT.parent / "shared" / "bench" / "trl_baseline.py")


DEFAULT_TRL_SCRIPT = os.environ.get("RLHF_JAX_TRL_SCRIPT") or _default_trl_script()

# Same values as rlhf_jax.launch.ALLOCATOR_ENV (kept literal so this script needs no JAX import).
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                 "MALLOC_TRIM_THRESHOLD_": "17179869184"}

# (row name, unit, kind, ours path, TRL f32 path, TRL bf16-autocast path, note); our JSON has the
# same keys in both precisions. kind "rate": higher is better, ratio = ours / theirs; "time":
# ratio = theirs / ours.
ROWS = [
    ("sft", "tokens/s", "rate", "sft_tokens_per_s", "sft_trl.tokens_per_s",
     "sft_trl_bf16.tokens_per_s", ""),
    ("rm", "pairs/s", "rate", "rm_pairs_per_s", "rm_trl.pairs_per_s", "rm_trl_bf16.pairs_per_s",
     ""),
    ("dpo", "pairs/s", "rate", "dpo_pairs_per_s", "dpo_trl.pairs_per_s",
     "dpo_trl_bf16.pairs_per_s", "reference log-probs recomputed every step, both"),
    ("generation", "new tokens/s", "rate", "gen_new_tokens_per_s", "gen.new_tokens_per_s",
     "gen_bf16.new_tokens_per_s", "TRL column = HF generate"),
    ("ppo iteration", "s/iter", "time", "ppo_iter_s", "ppo_trl.median_iter_s",
     "ppo_trl_bf16.median_iter_s", "separate RM, value, reference; 32 tokens forced"),
    ("  ppo: generation", "s/iter", "time", "ppo_phases_s.gen_s", "ppo_trl.gen_s",
     "ppo_trl_bf16.gen_s", ""),
    ("  ppo: scoring", "s/iter", "time", "ppo_phases_s.scoring_s", "ppo_trl.rollout_scoring_s",
     "ppo_trl_bf16.rollout_scoring_s", ""),
    ("  ppo: updates", "s/iter", "time", "ppo_phases_s.update_s", "ppo_trl.train_and_rest_s",
     "ppo_trl_bf16.train_and_rest_s", "TRL: PPO epochs, GAE, logging"),
    ("dpo, reference log-probs precomputed (ours)", "pairs/s", "rate",
     "dpo_pairs_per_s_precomputed", "dpo_trl.pairs_per_s", "dpo_trl_bf16.pairs_per_s",
     "different work: TRL recomputes"),
    ("ppo iteration, shared value trunk (ours)", "s/iter", "time", "ppo_iter_s_shared_value",
     "ppo_trl.median_iter_s", "ppo_trl_bf16.median_iter_s",
     "different work: TRL has a separate value model"),
]
PRECISIONS = ("float32", "bf16")


def dig(d: dict, path: str | None):
    """``d["a"]["b"]`` for ``"a.b"``; None when missing or not a number."""
    if path is None:
        return None
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def last_json_line(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object (the programs' result line)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON result line in the program's output")


def stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def ratio(kind: str, ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return None
    return ours / theirs if kind == "rate" else theirs / ours


def _best(kind: str, values: list[float | None]) -> float | None:
    """The fastest of one round's settings: the largest rate or the smallest time."""
    values = [v for v in values if v is not None and v > 0]
    if not values:
        return None
    return max(values) if kind == "rate" else min(values)


def summarize(ours: dict[str, list[dict]], trl_runs: list[dict]) -> list[dict]:
    """One row per workload: medians and spreads of our runs per precision (``ours`` maps a
    precision to its runs, round i at index i) and of TRL float32 / bf16 autocast, then the
    ratios of the medians — best vs best (each program's fastest setting by median), f32 vs f32,
    bf16 vs bf16 — and for each the spread of the per-round ratios (round i of ours against
    round i of TRL; best vs best takes each round's fastest setting on both sides)."""
    out = []
    n = len(trl_runs)
    for name, unit, kind, o_path, t32_path, t16_path, note in ROWS:
        cols = {f"ours_{p}": [dig(r, o_path) for r in ours.get(p, [])] for p in PRECISIONS}
        cols["trl_float32"] = [dig(r, t32_path) for r in trl_runs]
        cols["trl_bf16"] = [dig(r, t16_path) for r in trl_runs]
        row = {"workload": name, "unit": unit, "kind": kind, "note": note}
        row.update({c: stats(v) for c, v in cols.items()})
        if all(row[c] is None for c in cols):
            continue
        med = {c: row[c]["median"] if row[c] else None for c in cols}
        best_o = _best(kind, [med["ours_float32"], med["ours_bf16"]])
        best_t = _best(kind, [med["trl_float32"], med["trl_bf16"]])
        row["best_ours"] = next((p for p in PRECISIONS if best_o is not None
                                 and med[f"ours_{p}"] == best_o), None)
        row["best_trl"] = next((p for p in PRECISIONS if best_t is not None
                                and med[f"trl_{p}"] == best_t), None)
        row["ratio_best"] = ratio(kind, best_o, best_t)
        rounds = lambda col, i: cols[col][i] if i < len(cols[col]) else None  # noqa: E731
        row["ratio_best_pairs"] = stats([ratio(
            kind, _best(kind, [rounds(f"ours_{p}", i) for p in PRECISIONS]),
            _best(kind, [rounds(f"trl_{p}", i) for p in PRECISIONS])) for i in range(n)])
        for p in PRECISIONS:
            row[f"ratio_{p}"] = ratio(kind, med[f"ours_{p}"], med[f"trl_{p}"])
            row[f"ratio_{p}_pairs"] = stats([ratio(kind, rounds(f"ours_{p}", i),
                                                   rounds(f"trl_{p}", i)) for i in range(n)])
        out.append(row)
    return out


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def _cell(s: dict | None) -> str:
    if s is None:
        return "—"
    if s["n"] == 1:
        return _fmt(s["median"])
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}–{_fmt(s['max'])})"


def _ratio_cell(r: float | None, pairs: dict | None) -> str:
    if r is None:
        return "—"
    if pairs is None or pairs["n"] == 1:
        return f"{r:.2f}×"
    return f"{r:.2f}× ({pairs['min']:.2f}–{pairs['max']:.2f})"


def markdown(rows: list[dict], n_pairs: int, extra: dict | None = None) -> str:
    cols = [("ours_float32", "rlhf_jax f32"), ("ours_bf16", "rlhf_jax bf16"),
            ("trl_float32", "TRL f32"), ("trl_bf16", "TRL bf16 autocast")]
    cols = [(c, t) for c, t in cols if any(r[c] for r in rows)]
    head = ["workload", "unit", *(t for _, t in cols), "best vs best", "f32 vs f32",
            "bf16 vs bf16", "note"]
    lines = [f"Medians of {n_pairs} alternating round(s), spread (min–max) in brackets; ratios are "
             "of the medians (rlhf_jax/TRL for throughputs, TRL/rlhf_jax for times: > 1 = "
             "rlhf_jax faster), the spread of the per-round ratios in brackets; best vs best "
             "compares each program's fastest setting (its precision in brackets after the "
             "ratio: ours / TRL).", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    short = {"float32": "f32", "bf16": "bf16", None: "—"}
    for r in rows:
        best = _ratio_cell(r["ratio_best"], r["ratio_best_pairs"])
        if r["ratio_best"] is not None:
            best = f"**{best}** [{short[r['best_ours']]} / {short[r['best_trl']]}]"
        lines.append("| " + " | ".join([
            r["workload"], r["unit"], *(_cell(r[c]) for c, _ in cols), best,
            _ratio_cell(r["ratio_float32"], r["ratio_float32_pairs"]),
            _ratio_cell(r["ratio_bf16"], r["ratio_bf16_pairs"]), r["note"]]) + " |")
    for k, v in (extra or {}).items():
        lines.append(f"\n{k}: {v}")
    return "\n".join(lines) + "\n"


def extras(ours: dict[str, list[dict]], trl_runs: list[dict]) -> dict:
    """MFU against each precision's same-run peak, compile times, peak RSS and machine load, for
    the notes under the table."""
    ex = {}
    for prec, runs in ours.items():
        peak = stats([dig(r, "matmul_peak_gflops") for r in runs])
        for w in ("sft", "rm", "dpo", "dpo_with_reference_forward", "dpo_executed",
                  "dpo_executed_with_reference_forward", "ppo", "ppo_shared_value"):
            mfu = stats([None if dig(r, f"mfu.{w}") is None else 100 * dig(r, f"mfu.{w}")
                         for r in runs])
            if mfu and peak:
                ex[f"rlhf_jax {prec} {w} MFU"] = (
                    f"{_cell(mfu)} % of the {prec} 1024³ matmul peak measured in the same run, "
                    f"{_cell(peak)} GFLOP/s")
        share = {k: stats([None if dig(r, f"gen_of_bound.{k}") is None
                           else 100 * dig(r, f"gen_of_bound.{k}") for r in runs])
                 for k in ("roofline", "bandwidth")}
        bw = stats([dig(r, "read_bandwidth_gbs") for r in runs])
        if share["roofline"] and bw:
            ex[f"rlhf_jax {prec} generation against its bounds"] = (
                f"{_cell(share['roofline'])} % of the roofline bound, "
                f"{_cell(share['bandwidth'])} % of the memory-bandwidth bound (weights and KV "
                f"cache read per step at the {_cell(bw)} GB/s read bandwidth measured in the "
                f"same run; benchmarks/roofline.py)")
        comp = {}
        for r in runs:
            for k, v in (r.get("compile_s") or {}).items():
                comp.setdefault(k, []).append(v)
        if comp:
            ex[f"rlhf_jax {prec} compile_s (per run)"] = ", ".join(
                f"{k} {_cell(stats(v))}" for k, v in comp.items())
        rss = stats([dig(r, "peak_rss_mb") for r in runs])
        if rss:
            ex[f"rlhf_jax {prec} peak RSS (MB)"] = _cell(rss)
    loads = stats([dig(r, "loadavg_before") for runs in (*ours.values(), trl_runs)
                   for r in runs])
    if loads:
        ex["1-min load average before each run"] = _cell(loads)
    return ex


def cpu_info() -> dict:
    """The CPU the pairs ran on: the ratios to PyTorch depend on it (README, Benchmarks)."""
    info = {"cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(ln.split(":", 1) for ln in text.splitlines() if ":" in ln)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    info["model"] = fields.get("model name", "")
    info["simd"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
                            if f in flags)
    return info


def native_bf16(info: dict) -> bool:
    return any(f in info.get("simd", "").split() for f in ("avx512_bf16", "amx_bf16"))


# trl_baseline.py's benchmarks of TRL's two settings: float32 and bf16 autocast without gradient
# checkpointing (never its defaults with checkpointing, nor the bare PyTorch loops)
TRL_F32_BENCHES = "sft_trl,rm_trl,dpo_trl,ppo_trl,gen"
TRL_BF16_BENCHES = "sft_trl_bf16,rm_trl_bf16,dpo_trl_bf16,ppo_trl_bf16,gen_bf16"


def trl_command(trl_python: str, trl_script: str, quick: list[str], trl_args: str,
                trl_bf16: str, info: dict) -> list[str]:
    """The TRL command line: float32, plus bf16 autocast (``--bf16``) with ``trl_bf16="yes"``,
    or with ``"auto"`` on a CPU with bf16 instructions (``avx512_bf16`` / ``amx_bf16``; elsewhere
    PyTorch emulates bf16, 49-55× slower than its float32 on an AVX2 EPYC). An explicit
    ``--only`` in ``trl_args`` is kept as given."""
    args = shlex.split(trl_args)
    bf16 = trl_bf16 == "yes" or (trl_bf16 == "auto" and native_bf16(info))
    if "--only" not in args:
        args += ["--only", TRL_F32_BENCHES + ("," + TRL_BF16_BENCHES if bf16 else "")]
    if bf16 and "--bf16" not in args:
        args.append("--bf16")
    return [trl_python, trl_script, *quick, *args]


def our_precisions(choice: str, info: dict) -> list[str]:
    """``auto``: float32, plus bf16 on a CPU with bf16 instructions; else the comma list."""
    if choice == "auto":
        return ["float32", "bf16"] if native_bf16(info) else ["float32"]
    out = [p for p in choice.split(",") if p]
    bad = [p for p in out if p not in PRECISIONS]
    if bad or not out:
        raise ValueError(f"--precisions: {choice!r}; choose auto or from {PRECISIONS}")
    return out


def run_program(cmd: list[str], env: dict, log_path: Path) -> dict:
    t0 = time.perf_counter()
    load = float(open("/proc/loadavg").read().split()[0]) if os.path.exists("/proc/loadavg") else None
    print(f"[side_by_side] {shlex.join(cmd)}   (loadavg {load})", file=sys.stderr, flush=True)
    with open(log_path, "w") as err:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[1]} exited {p.returncode}; see {log_path}")
    res = last_json_line(p.stdout)
    log_path.with_suffix(".json").write_text(json.dumps(res) + "\n")   # kept if a later run fails
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["loadavg_before"] = load
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5,
                    help="alternating rounds (ours in each precision, then TRL)")
    ap.add_argument("--out", default="runs/side_by_side", help="directory for JSON, table, logs")
    ap.add_argument("--quick", action="store_true", help="pass --quick to both programs")
    ap.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    ap.add_argument("--trl-script", default=DEFAULT_TRL_SCRIPT)
    ap.add_argument("--ours-args", default="", help="extra arguments for benchmarks/run.py")
    ap.add_argument("--trl-args", default="", help="extra arguments for trl_baseline.py")
    ap.add_argument("--precisions", default="auto",
                    help="our precisions: auto (float32, plus bf16 on a CPU with bf16 "
                         "instructions) or a comma list of float32,bf16")
    ap.add_argument("--trl-bf16", choices=("auto", "yes", "no"), default="auto",
                    help="run TRL's bf16 autocast too: auto = only on a CPU with bf16 "
                         "instructions (elsewhere PyTorch emulates bf16, ~50x slower)")
    ap.add_argument("--trl-json", default="",
                    help="use this file's JSON line(s) as the TRL results instead of running TRL")
    ap.add_argument("--ours-json", default="",
                    help="use this file's JSON line(s) as our results instead of running run.py "
                         "(each line's 'precision' key, float32 when missing, sorts it)")
    a = ap.parse_args(argv)
    if a.pairs < 1:
        ap.error("--pairs must be >= 1")
    cpu = cpu_info()
    try:
        precisions = our_precisions(a.precisions, cpu)
    except ValueError as e:
        ap.error(str(e))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **ALLOCATOR_ENV)
    quick = ["--quick"] if a.quick else []
    ours_cmd = lambda p: [sys.executable, str(ROOT / "benchmarks" / "run.py"),  # noqa: E731
                          "--workload", "reference", "--precision", p, *quick,
                          *shlex.split(a.ours_args)]
    trl_cmd = trl_command(a.trl_python, a.trl_script, quick, a.trl_args, a.trl_bf16, cpu)

    def canned(path: str) -> list[dict]:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip().startswith("{")]
        return [json.loads(ln) for ln in lines]

    ours: dict[str, list[dict]] = {p: [] for p in precisions}
    if a.ours_json:
        ours = {}
        for r in canned(a.ours_json):
            ours.setdefault(r.get("precision", "float32"), []).append(r)
    trl_runs = canned(a.trl_json) if a.trl_json else []
    for i in range(a.pairs):          # ours (each precision), TRL, ours, TRL, ...
        if not a.ours_json:
            for p in precisions:
                ours[p].append(run_program(ours_cmd(p), env, out / f"ours_{p}_{i}.log"))
        if not a.trl_json:
            trl_runs.append(run_program(trl_cmd, env, out / f"trl_{i}.log"))
    rows = summarize(ours, trl_runs)
    ex = extras(ours, trl_runs)
    n = min([len(trl_runs), *(len(v) for v in ours.values())])
    ex["CPU"] = ", ".join(f"{k} {v}" for k, v in cpu.items())
    table = markdown(rows, n, ex)
    result = {"pairs": n, "allocator_env": ALLOCATOR_ENV, "cpu": cpu, "rows": rows, "extras": ex,
              "ours_cmds": {p: ours_cmd(p) for p in ours}, "trl_cmd": trl_cmd,
              "ours_runs": ours, "trl_runs": trl_runs}
    (out / "side_by_side.json").write_text(json.dumps(result, indent=1))
    (out / "side_by_side.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
