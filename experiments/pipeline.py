"""The main job: the full InstructGPT pipeline on the embedded task — pretrain, SFT, simulated
preferences and reward model, PPO — and the held-out evaluation of base, SFT, best-of-N and RLHF.

Each stage is its own script (``pretrain.py``, ``sft.py``, ``reward.py``, ``ppo.py``) writing its
own run directory under ``<out>/`` and starting from the previous one's; a stage that already
finished there is reused, so a killed pipeline continues where it stopped. ``<out>/summary.json``
is the PPO stage's summary (which holds the base, SFT, RLHF and best-of-N evaluations) plus the
total wall time.

    python experiments/pipeline.py --out runs/pipeline            # default config
    python experiments/pipeline.py --out runs/seed1 --seed 1      # another seed
    python experiments/pipeline.py --help                         # every option
"""

from rlhf_jax import launch

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

import dataclasses
import time
from pathlib import Path
from typing import Any

from rlhf_jax import cli, progress, scripts
from rlhf_jax.configs import ConfigError
from rlhf_jax.runs import RunDir, config_differences, read_config_json
from rlhf_jax.stages.common import read_config
from rlhf_jax.stages.pipeline import PipelineConfig
from rlhf_jax.stages.reward import RewardConfig


def check_final(path: Path, script: str, cfg) -> None:
    """A finished ``final`` stage (whose config is not in the pipeline's ``config.json``) is
    reused only if it ran with ``cfg`` (its upstream config as it resolves it): a changed flag
    is refused naming the fields, never dropped silently."""
    up = read_config(cfg.reward_dir, RewardConfig)
    diff = config_differences(read_config_json(path / "config.json"),
                              dataclasses.replace(cfg, reward=up))
    if diff:
        raise ConfigError(f"the finished {script} run {path} was made with other settings than "
                          f"this command's: {', '.join(diff[:10])} — use the same options, or a "
                          "new output directory")


def run(cfg: PipelineConfig, out: str | Path, final: tuple[str, str, Any] | None = None
        ) -> dict:
    """Every stage into ``out/<stage>`` (finished ones reused), each seeded ``cfg.seed`` and
    started from the previous stage's directory; returns the last stage's summary + the wall
    time. ``final``: ``(directory, script, config)`` of a last stage run from the reward run in
    place of PPO (e.g. ``("dpo", "dpo", OfflineConfig(...))``)."""
    out, t0 = Path(out), time.perf_counter()
    run = RunDir(out)
    run.write_config(cfg)
    run.write_meta(seed=cfg.seed)
    last, script, last_cfg = final or ("ppo", "ppo", cfg.ppo)
    stages = (  # (directory, script, its config with the previous stage's directory set)
        ("pretrain", "pretrain", cfg.pretrain),
        ("sft", "sft", dataclasses.replace(cfg.sft, pretrain_dir=str(out / "pretrain"))),
        ("reward", "reward", dataclasses.replace(cfg.reward, sft_dir=str(out / "sft"))),
        (last, script, dataclasses.replace(last_cfg, reward_dir=str(out / "reward"))),
    )
    ran = False
    for name, script, stage_cfg in stages:
        stage_cfg = dataclasses.replace(stage_cfg, seed=cfg.seed)
        if (out / name / "summary.json").exists():
            if final and name == last:
                check_final(out / name, script, stage_cfg)
            progress.reused(name, out / name)
        else:
            scripts.run(script, stage_cfg, out / name)
            ran = True
    # a rerun of a finished pipeline: as it was (with ``final``, <out>/summary.json may be of
    # another last stage run on the same upstream stages: made again from this one's)
    if not ran and not final and (out / "summary.json").exists():
        return run.read_summary()
    summary = dict(RunDir(out / last).read_summary())
    summary["time_s/pipeline"] = time.perf_counter() - t0
    run.write_summary(summary)
    return summary


def main(argv=None) -> dict:
    return cli.main(PipelineConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
