"""Reward over-optimisation measured against the hidden gold judge (Gao et al. 2022): PPO at
several KL coefficients and best-of-n (n = 1 … 32, SFT samples reranked by the RM), for the default
RM and a weaker one (a share of the same comparisons, trunk trained), both on the same SFT model.

Along each PPO trajectory the proxy (normalised RM score) and gold score of the iteration's own
rollouts against d = sqrt(exact KL to SFT); held-out evaluation at the end of each cell. Best-of-n
from one pool of SFT samples per held-out prompt: its exact KL (the best-of-n distribution over
the distinct responses, ``rlhf_jax.best_of_n``) beside the bound log n − (n − 1)/n. Gao et al.'s
forms fitted to the gold gains (``rlhf_jax.overoptimisation``). It is a sweep (``rlhf_jax.sweep``):
every run has its directory under ``--out``; finished ones are reused, interrupted ones resume.

Writes ``summary.json`` (``fit/{bon,rl}/{alpha,beta,r2}``, ``kl_at_gold_peak/rl``,
``gold/peak/{rl,bon}``, …, and the same with ``/weak_rm``), ``results.md``, ``results.json``
(every curve), ``proxy_vs_gold.png`` and ``gold_vs_kl.png``.

    python experiments/overoptimisation.py --out runs/overopt
    python experiments/overoptimisation.py --out runs/overopt --reward-dir runs/pipeline/reward
"""

from rlhf_jax import launch

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from rlhf_jax import best_of_n as bon, cli, overoptimisation as oo, progress, sweep
from rlhf_jax.configs import check, check_numbers, positive
from rlhf_jax.runs import RunDir, read_metrics
from rlhf_jax.stages import ppo
from rlhf_jax.stages.common import STREAM_EVAL, read_config, stage_key, upstream_run
from rlhf_jax.stages.ppo import PPOConfig
from rlhf_jax.stages.reward import RewardConfig
from rlhf_jax.sweep import Cell

SUFFIX = {"default": "", "weak": "/weak_rm"}
STREAM_POOL = STREAM_EVAL + 10   # the best-of-n pool's sampling stream (apart from the stages')


@dataclasses.dataclass(frozen=True)
class OveroptConfig:
    """Attributes:
      seed: seed of every PPO run, the weak RM and the best-of-n pool.
      reward_dir: the finished default reward run (its SFT model, comparisons and RM); empty = run
        the default pretrain + SFT + RM (seed ``upstream_seed``) into ``<out>/reward``.
      upstream_seed: seed of that default upstream.
      reward: the reward config used when ``reward_dir`` is empty.
      weak_rm: also run everything with the weaker RM.
      weak_share: the weaker RM's share of the default RM's labelled training prompts (the first
        ones), trained with its trunk unfrozen, otherwise the default RM's config.
      kl_coefs: PPO's KL coefficients β, one PPO run per RM and β.
      extra_cells: more PPO runs per RM, each ``name=value …`` overrides of the template (flags
        of ``experiments/ppo.py``); the default pushes further from SFT: β = 0 and a 4× policy
        learning rate.
      ppo: the PPO template (iterations, optimiser, …); ``ppo.kl_coef`` is set per cell.
      ns: best-of-n's n.
      pool: SFT samples per held-out prompt that best-of-n is estimated from (≥ max n).
    """

    seed: int = 0
    reward_dir: str = ""
    upstream_seed: int = 0
    reward: RewardConfig = RewardConfig()
    weak_rm: bool = True
    weak_share: float = 0.1
    kl_coefs: tuple[float, ...] = (0.05, 0.01, 0.002)
    extra_cells: tuple[str, ...] = ("ppo.kl-coef=0 policy-optim.learning-rate=0.0002",)
    ppo: PPOConfig = PPOConfig()
    ns: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    pool: int = 128

    def __post_init__(self):
        check_numbers(self)
        positive(self, "pool")
        check(0 < self.weak_share < 1, "weak_share", "must be strictly between 0 and 1")
        check(len(self.kl_coefs) >= 1 and all(b >= 0 for b in self.kl_coefs), "kl_coefs",
              "name one or more coefficients >= 0")
        check(len(set(self.kl_coefs)) == len(self.kl_coefs), "kl_coefs", "lists a β twice")
        check(all("=" in t for c in self.extra_cells for t in c.split()), "extra_cells",
              "each cell is `name=value …` flags of experiments/ppo.py")
        check(len(self.ns) >= 2 and all(n >= 1 for n in self.ns) and list(self.ns) ==
              sorted(set(self.ns)), "ns", "must be two or more increasing n >= 1")
        check(self.pool >= max(self.ns), "pool", f"must be >= the largest n ({max(self.ns)})")


def weak_cell(cfg: OveroptConfig, reward_dir: Path) -> Cell:
    """The weaker RM: the default reward run's config on ``weak_share`` of its labelled training
    prompts (its stored comparisons, no new labelling), trunk not frozen."""
    rc = read_config(reward_dir, RewardConfig)
    n = RunDir(reward_dir).read_summary()["preferences/train_prompts"]
    data = rc.preferences_dir or str(Path(reward_dir) / "data")
    share = max(int(round(cfg.weak_share * n)), rc.batch_prompts)
    return Cell("rm-weak", "reward", dataclasses.replace(
        rc, preferences_dir=data, train_prompts=share, freeze_trunk=False),
        {"train_prompts": share, "freeze_trunk": False})


def ppo_cells(cfg: OveroptConfig, rm: str, rm_dir: Path) -> list[Cell]:
    """The PPO runs of one RM: one per β of ``kl_coefs``, then ``extra_cells`` (validated by the
    sweep engine against PPO's config)."""
    template = dataclasses.replace(cfg.ppo, reward_dir=str(rm_dir))
    cells = [Cell(f"ppo-{rm}-kl{b:g}", "ppo", dataclasses.replace(
        template, ppo=dataclasses.replace(cfg.ppo.ppo, kl_coef=b)), {"rm": rm, "ppo.kl-coef": b})
        for b in cfg.kl_coefs]
    extra = [dict(t.split("=", 1) for t in c.split()) for c in cfg.extra_cells]
    for c in sweep.override_cells("ppo", extra, template):   # e.g. ppo-default-kl-coef=0,…
        short = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in c.overrides.items())
        cells.append(dataclasses.replace(c, name=f"ppo-{rm}-{short}",
                                         overrides={"rm": rm, **c.overrides}))
    return cells


def bon_curve(cfg: OveroptConfig, out: Path, rm: str, rm_dir: Path) -> list[dict]:
    """Best-of-n of the SFT policy reranked by the RM in ``rm_dir``, from the shared pool
    (``<out>/bon/pool.json``, sampled once); cached as ``<out>/bon/<rm>.json``."""
    path, pool_path = out / "bon" / f"{rm}.json", out / "bon" / "pool.json"
    if path.exists():
        return json.loads(path.read_text())
    up = ppo.load_upstream(rm_dir, cfg.ppo.normalize_rm, cfg.ppo.precision)
    shapes = up.pretrain.task
    if pool_path.exists():
        pool = json.loads(pool_path.read_text())
    else:
        with progress.stage("best-of-n pool", pool_path):
            pool = bon.sample_pool(up.ref, up.sft_params, up.task, shapes,
                                   stage_key(cfg.seed, STREAM_POOL), size=cfg.pool)
        RunDir(out / "bon").write_json("pool.json", pool)
    import jax

    proxy = bon.score_pool(pool, up.task, shapes, jax.jit(up.score), up.rm_params,
                           gain=up.gain, bias=up.bias)
    curve = bon.pool_curve(pool["texts"], proxy, np.asarray(pool["gold"]), cfg.ns)
    RunDir(out / "bon").write_json(f"{rm}.json", curve)
    return curve


def read_rm(cells: list[Cell], run_dirs: dict[str, Path], curve: list[dict]) -> dict:
    """One RM's trajectories, finals (held-out, with best-of-n at the same KL) and fits."""
    traj = {c.name: oo.trajectory(read_metrics(run_dirs[c.name])) for c in cells}
    finals = []
    for c in cells:
        s, pts = RunDir(run_dirs[c.name]).read_summary(), traj[c.name]
        finals.append({"cell": c.name, "kl_coef": c.config.ppo.kl_coef,
                       "kl": s["kl/rlhf_vs_sft"], "gold": s["gold/rlhf"],
                       "gold_sft": s["gold/sft"],
                       "kl_max": max(p["kl"] for p in pts), "proxy_last": pts[-1]["proxy"],
                       "gold_last": pts[-1]["gold"]})
    gold0 = float(np.mean([pts[0]["gold"] for pts in traj.values()]))   # iteration 1: SFT
    points = [p for pts in traj.values() for p in pts]
    d = np.sqrt([p["kl"] for p in points])
    fits = {"rl": oo.read_out(d, [p["gold"] for p in points], gold0, "rl"),
            "bon": oo.read_out(np.sqrt([p["kl"] for p in curve]), [p["gold"] for p in curve],
                               curve[0]["gold"], "bon"),
            "bon_bound": oo.read_out(np.sqrt([p["kl_bound"] for p in curve]),
                                     [p["gold"] for p in curve], curve[0]["gold"], "bon")}
    along = [{"n": p["n"], "kl": p["kl"], "bon_gain": p["gold"] - curve[0]["gold"],
              **{f"rl_gain/{c}": (None if (g := oo.at_kl(pts, p["kl"])) is None else g - gold0)
                 for c, pts in traj.items()}} for p in curve]
    return {"bon": curve, "trajectories": traj, "matched": oo.matched(finals, curve),
            "fits": fits, "gains_at_bon_kl": along}


def summarise(per_rm: dict[str, dict]) -> dict:
    out = {}
    for rm, r in per_rm.items():
        sfx = SUFFIX[rm]
        for name, f in r["fits"].items():
            out.update({f"fit/{name}/{k}{sfx}": f[k] for k in ("alpha", "beta", "r2")})
        for name in ("rl", "bon"):
            f = r["fits"][name]
            out.update({f"kl_at_gold_peak/{name}{sfx}": f["kl_at_peak"],
                        f"kl_at_gold_peak_fitted/{name}{sfx}": f["kl_at_peak_fitted"],
                        f"kl/max_reached/{name}{sfx}": f["kl_max"],
                        f"gold/peak/{name}{sfx}": f["gold_peak"],
                        f"gold/max_measured/{name}{sfx}": f["gold_max"],
                        f"gold/zero/{name}{sfx}": f["gold0"]})
        for p in r["bon"]:
            out.update({f"gold/bon_n{p['n']}{sfx}": p["gold"], f"kl/bon_n{p['n']}{sfx}": p["kl"],
                        f"kl/bon_bound_n{p['n']}{sfx}": p["kl_bound"]})
        for m in r["matched"]:
            out.update({f"kl/{m['cell']}": m["kl"], f"gold/{m['cell']}": m["gold"],
                        f"gold/bon_at_kl_of/{m['cell']}": m["gold_bon"]})
    return out


def run(cfg: OveroptConfig, out: str | Path) -> dict:
    out, t0 = Path(out), time.perf_counter()
    run_dir = RunDir(out)
    run_dir.write_config(cfg)
    run_dir.write_meta(seed=cfg.seed)
    reward_dir = upstream_run(cfg.reward_dir, out / "reward", "reward",
                              dataclasses.replace(cfg.reward, seed=cfg.upstream_seed),
                              "reward_dir")
    rms = {"default": reward_dir}
    if cfg.weak_rm:
        weak = weak_cell(cfg, reward_dir)
        rms["weak"] = out / weak.name / f"seed{cfg.seed}"
    curves = {"default": bon_curve(cfg, out, "default", reward_dir)}
    of_rm = {rm: ppo_cells(cfg, rm, d) for rm, d in rms.items()}
    cells = of_rm["default"] + ([weak, *of_rm["weak"]] if cfg.weak_rm else [])
    rows = sweep.run_cells(cells, [cfg.seed], out, metrics=("gold/*", "kl/*", "rm/gold_agree*"))
    run_dirs = {r["cell"]: Path(r["dir"]) for r in rows}
    if cfg.weak_rm:
        curves["weak"] = bon_curve(cfg, out, "weak", rms["weak"])
    per_rm = {rm: read_rm(of_rm[rm], run_dirs, curves[rm]) for rm in rms}
    (out / "results.md").write_text(oo.markdown(per_rm))
    run_dir.write_json("results.json", per_rm)
    oo.plot(per_rm, out)
    summary = {**summarise(per_rm), "reward_dir": str(reward_dir),
               "time_s/overoptimisation": time.perf_counter() - t0}
    run_dir.write_summary(summary)
    return summary


def main(argv=None) -> dict:
    return cli.main(OveroptConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
