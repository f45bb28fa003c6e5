#!/usr/bin/env python
"""Side-by-side benchmark: rlhf_jax (``benchmarks/run.py``) against Hugging Face TRL
(``../shared/bench/trl_baseline.py``) on the same reference workload, alternating the two programs
(ours, TRL, ours, TRL, …) for ``--pairs`` pairs under the same glibc allocator settings.

Writes ``side_by_side.json`` (every raw JSON line and the summary) and ``side_by_side.md`` (a table
of medians over the runs, their spread min–max, and the ratio per workload: ours/TRL for
throughputs, TRL/ours for times — above 1 means rlhf_jax is faster) into ``--out``, and prints the
table. Besides TRL float32 it compares against the bare PyTorch loops and TRL's own bf16 defaults
that ``trl_baseline.py`` also prints.
On a CPU without bf16 instructions TRL's bf16 defaults are left out (PyTorch emulates bf16
there, ~50× slower than its float32; ``--trl-bf16 yes`` runs them anyway).

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

# (row name, unit, kind, ours path, TRL f32 path, bare torch path, TRL bf16-defaults path, note)
# kind "rate": higher is better, ratio = ours / theirs; "time": ratio = theirs / ours.
ROWS = [
    ("sft", "tokens/s", "rate", "sft_tokens_per_s", "sft_trl.tokens_per_s",
     "sft_torch.tokens_per_s", "sft_trl_defaults.tokens_per_s", ""),
    ("rm", "pairs/s", "rate", "rm_pairs_per_s", "rm_trl.pairs_per_s", "rm_torch.pairs_per_s",
     "rm_trl_defaults.pairs_per_s", ""),
    ("dpo", "pairs/s", "rate", "dpo_pairs_per_s", "dpo_trl.pairs_per_s", "dpo_torch.pairs_per_s",
     "dpo_trl_defaults.pairs_per_s", "reference log-probs recomputed every step, both"),
    ("dpo, reference log-probs precomputed (ours)", "pairs/s", "rate",
     "dpo_pairs_per_s_precomputed", "dpo_trl.pairs_per_s", "dpo_torch.pairs_per_s",
     "dpo_trl_defaults.pairs_per_s", "different work: TRL recomputes"),
    ("generation", "new tokens/s", "rate", "gen_new_tokens_per_s", "gen.new_tokens_per_s", None,
     None, "TRL column = HF generate"),
    ("ppo iteration", "s/iter", "time", "ppo_iter_s", "ppo_trl.median_iter_s", None, None,
     "separate RM, value, reference; 32 tokens forced"),
    ("  ppo: generation", "s/iter", "time", "ppo_phases_s.gen_s", "ppo_trl.gen_s", None, None, ""),
    ("  ppo: scoring", "s/iter", "time", "ppo_phases_s.scoring_s", "ppo_trl.rollout_scoring_s",
     None, None, ""),
    ("  ppo: updates", "s/iter", "time", "ppo_phases_s.update_s", "ppo_trl.train_and_rest_s",
     None, None, "TRL: PPO epochs, GAE, logging"),
    ("ppo iteration, shared value trunk (ours)", "s/iter", "time", "ppo_iter_s_shared_value",
     "ppo_trl.median_iter_s", None, None, "different work: TRL has a separate value model"),
]


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


def summarize(ours_runs: list[dict], trl_runs: list[dict]) -> list[dict]:
    """One row per workload: medians and spreads of both programs and the ratios (of medians,
    and the spread of the per-pair ratios, pairing run i of ours with run i of TRL)."""
    out = []
    for name, unit, kind, o_path, t_path, torch_path, bf16_path, note in ROWS:
        o = [dig(r, o_path) for r in ours_runs]
        row = {"workload": name, "unit": unit, "kind": kind, "note": note, "ours": stats(o)}
        for col, path in (("trl", t_path), ("torch", torch_path), ("trl_bf16", bf16_path)):
            vals = [dig(r, path) for r in trl_runs]
            row[col] = stats(vals)
            med_o = row["ours"]["median"] if row["ours"] else None
            med_t = row[col]["median"] if row[col] else None
            row[f"ratio_{col}"] = ratio(kind, med_o, med_t)
            pairs = [ratio(kind, a, b) for a, b in zip(o, vals)]
            row[f"ratio_{col}_pairs"] = stats(pairs)
        if row["ours"] is None and row["trl"] is None:
            continue
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
    head = ("| workload | unit | rlhf_jax | TRL f32 | ratio vs TRL | bare PyTorch | ratio vs "
            "PyTorch | TRL bf16 defaults | ratio vs TRL bf16 | note |")
    lines = [f"Medians of {n_pairs} alternating pair(s), spread (min–max) in brackets; ratios are "
             "of the medians (rlhf_jax/TRL for throughputs, TRL/rlhf_jax for times: > 1 = "
             "rlhf_jax faster), the spread of the per-pair ratios in brackets.", "",
             head, "|" + "---|" * 10]
    for r in rows:
        lines.append("| " + " | ".join([
            r["workload"], r["unit"], _cell(r["ours"]), _cell(r["trl"]),
            _ratio_cell(r["ratio_trl"], r["ratio_trl_pairs"]), _cell(r["torch"]),
            _ratio_cell(r["ratio_torch"], r["ratio_torch_pairs"]), _cell(r["trl_bf16"]),
            _ratio_cell(r["ratio_trl_bf16"], r["ratio_trl_bf16_pairs"]), r["note"]]) + " |")
    for k, v in (extra or {}).items():
        lines.append(f"\n{k}: {v}")
    return "\n".join(lines) + "\n"


def extras(ours_runs: list[dict], trl_runs: list[dict]) -> dict:
    """MFU, compile times and machine load, for the notes under the table."""
    ex = {}
    peak = stats([dig(r, "matmul_peak_gflops") for r in ours_runs])
    for w in ("sft", "rm", "dpo", "ppo", "ppo_shared_value"):
        mfu = stats([None if dig(r, f"mfu.{w}") is None else 100 * dig(r, f"mfu.{w}")
                     for r in ours_runs])
        if mfu and peak:
            ex[f"rlhf_jax {w} MFU"] = (f"{_cell(mfu)} % of the f32 1024³ matmul peak measured in "
                                       f"the same run, {_cell(peak)} GFLOP/s")
    comp = {}
    for r in ours_runs:
        for k, v in (r.get("compile_s") or {}).items():
            comp.setdefault(k, []).append(v)
    if comp:
        ex["rlhf_jax compile_s (per run)"] = ", ".join(
            f"{k} {_cell(stats(v))}" for k, v in comp.items())
    rss = stats([dig(r, "peak_rss_mb") for r in ours_runs])
    if rss:
        ex["rlhf_jax peak RSS (MB)"] = _cell(rss)
    loads = stats([dig(r, "loadavg_before") for r in ours_runs + trl_runs])
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


# trl_baseline.py's float32 benchmarks: everything but TRL's bf16 defaults
TRL_F32_BENCHES = "sft_trl,sft_torch,rm_trl,rm_torch,dpo_trl,dpo_torch,ppo_trl,gen"


def trl_command(trl_python: str, trl_script: str, quick: list[str], trl_args: str,
                trl_bf16: str, info: dict) -> list[str]:
    """The TRL command line. TRL's bf16 defaults are left out (``--only`` the float32 benchmarks)
    with ``trl_bf16="no"``, or with ``"auto"`` on a CPU without bf16 instructions (no
    ``avx512_bf16`` / ``amx_bf16``), where PyTorch emulates bf16: measured on such a CPU, 49-55×
    slower than TRL's own float32, and over 40 minutes per TRL run. An explicit ``--only`` in
    ``trl_args`` is kept as given."""
    args = shlex.split(trl_args)
    native = any(f in info.get("simd", "").split() for f in ("avx512_bf16", "amx_bf16"))
    if "--only" not in args and (trl_bf16 == "no" or (trl_bf16 == "auto" and not native)):
        args += ["--only", TRL_F32_BENCHES]
    return [trl_python, trl_script, *quick, *args]


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
    ap.add_argument("--pairs", type=int, default=5, help="alternating (ours, TRL) pairs")
    ap.add_argument("--out", default="runs/side_by_side", help="directory for JSON, table, logs")
    ap.add_argument("--quick", action="store_true", help="pass --quick to both programs")
    ap.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON)
    ap.add_argument("--trl-script", default=DEFAULT_TRL_SCRIPT)
    ap.add_argument("--ours-args", default="", help="extra arguments for benchmarks/run.py")
    ap.add_argument("--trl-args", default="", help="extra arguments for trl_baseline.py")
    ap.add_argument("--trl-bf16", choices=("auto", "yes", "no"), default="auto",
                    help="run TRL's bf16 defaults too: auto = only on a CPU with bf16 "
                         "instructions (elsewhere PyTorch emulates bf16, ~50x slower)")
    ap.add_argument("--trl-json", default="",
                    help="use this file's JSON line(s) as the TRL results instead of running TRL")
    ap.add_argument("--ours-json", default="",
                    help="use this file's JSON line(s) as our results instead of running run.py")
    a = ap.parse_args(argv)
    if a.pairs < 1:
        ap.error("--pairs must be >= 1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **ALLOCATOR_ENV)
    quick = ["--quick"] if a.quick else []
    ours_cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--workload", "reference",
                *quick, *shlex.split(a.ours_args)]
    cpu = cpu_info()
    trl_cmd = trl_command(a.trl_python, a.trl_script, quick, a.trl_args, a.trl_bf16, cpu)

    def canned(path: str) -> list[dict]:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip().startswith("{")]
        return [json.loads(ln) for ln in lines]

    ours_runs = canned(a.ours_json) if a.ours_json else []
    trl_runs = canned(a.trl_json) if a.trl_json else []
    for i in range(a.pairs):          # ours, TRL, ours, TRL, …
        if not a.ours_json:
            ours_runs.append(run_program(ours_cmd, env, out / f"ours_{i}.log"))
        if not a.trl_json:
            trl_runs.append(run_program(trl_cmd, env, out / f"trl_{i}.log"))
    rows = summarize(ours_runs, trl_runs)
    ex = extras(ours_runs, trl_runs)
    n = min(len(ours_runs), len(trl_runs))
    ex["CPU"] = ", ".join(f"{k} {v}" for k, v in cpu.items())
    table = markdown(rows, n, ex)
    result = {"pairs": n, "allocator_env": ALLOCATOR_ENV, "rows": rows, "extras": ex,
              "ours_cmd": ours_cmd, "trl_cmd": trl_cmd, "ours_runs": ours_runs,
              "trl_runs": trl_runs}
    (out / "side_by_side.json").write_text(json.dumps(result, indent=1))
    (out / "side_by_side.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
