"""The loss zoo side by side on one task, from one SFT model and one budget: PPO, DPO, IPO, SimPO,
GRPO and RLOO by default; ``zoo2`` = DAPO, GSPO, REINFORCE++, KTO and ORPO; ``all`` = every one.

One upstream (pretrain → SFT → simulated preferences → RM) is shared by every method and seed:
the offline methods train on exactly the labelled comparisons the RM was trained on, the online
methods optimise that RM with the same number of RM-scored samples (iterations × prompts × group).
It is a preset of the sweep engine (:mod:`rlhf_jax.sweep`): each method is a cell, and each method
× seed writes its own run directory ``<out>/<method>/seed<S>`` (a finished one is reused, an
interrupted one resumes; ``index.jsonl`` lists the finished ones) and is evaluated under the pinned
protocol (held-out prompts, T = 1, ``eval_samples`` per prompt, paired with SFT by prompt and
sample index), plus ``eval_points − 1`` intermediate held-out evaluations that trace its gold-vs-KL
trajectory.

The metrics compared are the task's own (``Task.headline`` as table columns and curve, plus
``Task.reported``; the facts world: gold, fabrication rate, accuracy, unknown rate).

Writes ``results.md`` (mean ± std over seeds, at the defaults and at matched KL),
``results.json`` (every run's numbers and curve), ``gold_vs_kl.png`` and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from rlhf_jax import sweep
from rlhf_jax.configs import ConfigError, check, check_numbers, positive
from rlhf_jax.data.task import Task
from rlhf_jax.runs import RunDir, read_jsonl, read_metrics
from rlhf_jax.stages import compare_report as report
from rlhf_jax.stages.common import read_config, upstream_run
from rlhf_jax.stages.offline import STARTS_FROM_BASE, OfflineConfig
from rlhf_jax.stages.online import METHODS as ONLINE, online_config
from rlhf_jax.stages.ppo import PPOConfig
from rlhf_jax.stages.reward import RewardConfig
from rlhf_jax.sweep import Cell
from rlhf_jax.tasks import build_task

OFFLINE = ("dpo", "ipo", "simpo", "kto", "orpo")
DEFAULT = ("ppo", "dpo", "ipo", "simpo", "grpo", "rloo")
GROUPS = {"zoo2": ("dapo", "gspo", "reinforce_pp", "kto", "orpo"),
          # every method; GSPO-token is left out (GSPO's gradient, tested equal)
          "all": DEFAULT + ("dr_grpo", "dapo", "gspo", "reinforce_pp", "raft", "online_dpo",
                            "kto", "orpo")}
# offline learning rates other than the template's: ORPO trains the base model (SFT's own rate
# scale; at 5e-5 it does not learn the answer format in 400 steps)
OFFLINE_LEARNING_RATES = {"orpo": 1e-3}


def expand_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    """``methods`` with each group name (``zoo2``, ``all``) replaced by its methods, in order."""
    out: list[str] = []
    for m in methods:
        out += [x for x in GROUPS.get(m, (m,)) if x not in out]
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Attributes:
      methods: online (``ppo``, ``grpo``, ``dr_grpo``, ``rloo``, ``dapo``, ``gspo``,
        ``gspo_token``, ``reinforce_pp``, ``raft``, ``online_dpo``) and offline (``dpo``,
        ``ipo``, ``simpo``, ``kto``, ``orpo``) methods, each with its defaults, or the groups
        ``zoo2`` (DAPO, GSPO, REINFORCE++, KTO, ORPO) and ``all`` (every method but GSPO-token).
      seeds: the methods' seeds (sampling, data order, initialisation of new heads).
      reward_dir: the shared finished reward run (its SFT model and labelled comparisons); empty =
        run the default pretrain + SFT + RM (seed ``upstream_seed``) into ``<out>/reward``.
      upstream_seed: seed of that default upstream.
      reward: the reward config used when ``reward_dir`` is empty.
      ppo: template for the online methods (iterations, optimizer, …); each method's preset
        replaces its algorithm settings.
      offline: template for the offline methods (steps, β, …); ``loss`` is set per method.
      eval_points: held-out evaluations along each run, the final one included (≥ 1).
      samples_per_iter: RM-scored samples per online iteration for every online method (prompts
        per iteration = this ÷ the method's group size); 0 = each method's default (64 for all).
      matched_kl: the KL (nats/seq) of the matched-KL table; 0 = the smallest final KL of any run.
    """

    methods: tuple[str, ...] = ("ppo", "dpo", "ipo", "simpo", "grpo", "rloo")
    seeds: tuple[int, ...] = (0, 1, 2)
    reward_dir: str = ""
    upstream_seed: int = 0
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    offline: OfflineConfig = OfflineConfig()
    eval_points: int = 8
    samples_per_iter: int = 0
    matched_kl: float = 0.0

    def __post_init__(self):
        check_numbers(self)
        object.__setattr__(self, "methods", expand_methods(tuple(self.methods)))
        check(self.matched_kl >= 0, "matched_kl", "must be >= 0")
        positive(self, "eval_points")
        check(len(self.methods) > 0, "methods", "name at least one method")
        for m in self.methods:
            check(m in ONLINE or m in OFFLINE, "methods",
                  f"unknown method {m!r}; choose from {ONLINE + OFFLINE}")
        check(len(set(self.methods)) == len(self.methods), "methods", "lists a method twice")
        check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds",
              "must be one or more distinct seeds")
        check(self.samples_per_iter >= 0, "samples_per_iter", "must be >= 0")
        for m in self.methods:
            if m in ONLINE and self.samples_per_iter:
                g = online_config(m).ppo.group_size
                check(self.samples_per_iter % g == 0, "samples_per_iter",
                      f"{self.samples_per_iter} does not divide into {m}'s groups of {g}")
                try:   # the method's own checks (e.g. rows per minibatch), before any training
                    online_config(m, **_budget(m, self.samples_per_iter))
                except ConfigError as e:
                    raise ConfigError(f"samples_per_iter: {self.samples_per_iter} does not suit "
                                      f"{m}: {e}") from None
        check(self.eval_points <= self.ppo.iterations and self.eval_points <= self.offline.steps,
              "eval_points", "exceeds the number of iterations / steps")


def _every(total: int, points: int) -> int:
    """Evaluate every ``total // points`` steps (0 = only the final evaluation)."""
    return 0 if points <= 1 else max(total // points, 1)


def _budget(method: str, samples_per_iter: int) -> dict:
    """An online method's preset overrides for ``samples_per_iter`` RM-scored samples per
    iteration: its prompts per iteration (and DAPO's kept groups, at its oversampling factor)."""
    hp = online_config(method).ppo
    out = {"prompts_per_iter": samples_per_iter // hp.group_size}
    if hp.keep_groups:
        out["keep_groups"] = max(out["prompts_per_iter"] * hp.keep_groups // hp.prompts_per_iter,
                                 1)
    return out


def method_cell(cfg: CompareConfig, method: str, reward_dir: str) -> Cell:
    """The sweep cell of one method: its script (``dpo`` or ``ppo``) and its config (the template,
    the method's preset or loss, the shared budget and evaluation points; seed set per run)."""
    seed = cfg.seeds[0]
    if method in OFFLINE:
        c = dataclasses.replace(cfg.offline, loss=method, seed=seed, reward_dir=reward_dir,
                                eval_every=_every(cfg.offline.steps, cfg.eval_points))
        if method in OFFLINE_LEARNING_RATES:
            c = dataclasses.replace(c, optim=dataclasses.replace(
                c.optim, learning_rate=OFFLINE_LEARNING_RATES[method]))
        return Cell(method, "dpo", c, {"method": method})
    template = dataclasses.replace(cfg.ppo, seed=seed, reward_dir=reward_dir,
                                   eval_every=_every(cfg.ppo.iterations, cfg.eval_points))
    # PPO keeps the template's algorithm settings; the others take their presets
    overrides = dataclasses.asdict(cfg.ppo.ppo) if method == "ppo" else {}
    if cfg.samples_per_iter:
        overrides.update(_budget(method, cfg.samples_per_iter))
    return Cell(method, "ppo", online_config(method, ppo=template, **overrides),
                {"method": method})


def _read_one(cell: Cell, seed: int, out: Path, task: Task) -> dict:
    """One finished method × seed run's result (the task's metrics, curve, paired outcomes)."""
    method, c = cell.name, cell.config
    if method in OFFLINE:
        name, total = method, c.steps
        n = RunDir(c.reward_dir).read_summary().get("preferences/train_prompts", "?")
        data = ("one binary label per response of the RM's" if method == "kto" else
                "the RM's")
        budget = (f"{data} {n} labelled prompts (K-wise), {c.steps} steps × "
                  f"{c.batch_prompts} prompts"
                  + (", from the base model (not SFT)" if method in STARTS_FROM_BASE else ""))
    else:
        name, total = "rlhf", c.iterations
        budget = f"{c.iterations * c.ppo.rollout_size} RM-scored samples"
    s = RunDir(out).read_summary()
    along, metrics = task.headline[:2], task.headline + task.reported
    # the trajectory starts at SFT (KL 0) — except for a method trained from the base model
    curve = [] if method in STARTS_FROM_BASE else [(0.0, *[s[f"{m}/sft"] for m in along])]
    for row in read_metrics(out):
        if "heldout/gold" in row and row["step"] < total:
            curve.append((row["heldout/kl"], *[row[f"heldout/{m}"] for m in along]))
    kl = s[f"kl/{name}_vs_sft"]
    curve.append((kl, *[s[f"{m}/{name}"] for m in along]))
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()
               if line.strip()] if (out / "timings.jsonl").exists() else []
    train_s = s.get("time_s/offline") if method in OFFLINE else s.get("time_s/ppo")
    return {
        "method": method, "seed": seed, "dir": str(out), "budget": budget,
        **{m: s[f"{m}/{name}"] for m in metrics},
        "win_rate": s[f"win_rate/{name}_vs_sft"], "wins": s[f"wins/{name}_vs_sft"],
        "ties": s[f"ties/{name}_vs_sft"], "losses": s[f"losses/{name}_vs_sft"],
        "win_rate_ceiling": s["win_rate/ceiling"], "kl": kl, "curve": curve,
        "time_s": train_s, "timings": timings,
        "start": "base" if method in STARTS_FROM_BASE else "sft",
        "sft": {m: s[f"{m}/sft"] for m in metrics},
    }


def run_compare(cfg: CompareConfig, out: str | Path) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    run = RunDir(out)
    run.write_config(cfg)
    run.write_meta(seed=cfg.upstream_seed)
    default_reward = dataclasses.replace(cfg.reward, seed=cfg.upstream_seed)
    reward_dir = str(upstream_run(cfg.reward_dir, out / "reward", "reward",
                                  default_reward, "reward_dir"))
    t_up = time.perf_counter() - t0
    task = build_task(read_config(reward_dir, RewardConfig).sft.pretrain.task)
    results: dict[str, list[dict]] = {}
    # a rerun or resumed compare collects its finished runs again: each step is logged once
    logged = {row["step"] for row in read_jsonl(out / "metrics.jsonl")}

    def collect(cell: Cell, seed: int, run_dir: Path) -> None:
        r = _read_one(cell, seed, run_dir, task)
        results.setdefault(cell.name, []).append(r)
        step = len(sum(results.values(), []))
        if step not in logged:
            run.log_metrics(step, {f"{cell.name}/seed{seed}/{k}": r[k] for k in
                                   (*task.headline, "win_rate", "kl")})

    cells = [method_cell(cfg, m, reward_dir) for m in cfg.methods]
    sweep.run_cells(cells, cfg.seeds, out, table=None, on_run=collect)
    sft = [next(iter(results.values()))[0]["sft"]]   # one SFT model, one evaluation seed
    target = cfg.matched_kl or report.matched_kl(results)
    table = report.markdown(results, sft, target, headline=task.headline,
                            target_source="given by matched_kl" if cfg.matched_kl else
                            "the smallest final KL of any run")
    (out / "results.md").write_text(table)
    run.write_json("results.json", {"methods": list(cfg.methods), "matched_kl": target,
                                    "runs": results})
    report.plot(results, target, out / "gold_vs_kl.png")
    agg = report.aggregate(results, target, metrics=task.headline + task.reported,
                           curve=task.headline[:2])
    summary = {"matched_kl": target, "reward_dir": reward_dir,
               **{f"{k}/sft": v for k, v in sft[0].items()}}
    for method, row in agg.items():
        for key, val in row.items():
            if isinstance(val, tuple):
                summary[f"{method}/{key}"] = val[0]
                summary[f"{method}/{key}_std"] = val[1]
    summary["time_s/upstream"] = t_up
    summary["time_s/compare"] = time.perf_counter() - t0
    run.write_summary(summary)
    return summary
