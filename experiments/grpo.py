"""RLHF with a critic-free online method on PPO's compiled iteration: GRPO by default (Shao et al.
2024: G = 4 samples per prompt, group-normalised advantages (R_i − mean_g R)/std_g R, PPO's clipped
ratio averaged per sequence (1/|o_i|), β·k3 to the SFT policy in the loss; no critic), or with
``--method`` any preset of ``rlhf_jax.rl.presets``: ``dr_grpo``, ``rloo``, ``dapo``, ``gspo``,
``gspo_token``, ``reinforce_pp``, ``raft``, ``online_dpo`` (``ppo`` too). Same RM, SFT start,
iterations, RM-scored samples per iteration and held-out evaluation as experiments/ppo.py (summary
keys gold/rlhf etc.).

Every ``--ppo.*`` flag overrides the preset; e.g. ``--ppo.advantage dr_grpo
--ppo.loss-aggregation budget`` is Dr. GRPO (Liu et al. 2025).

    python experiments/grpo.py --out runs/grpo --reward-dir runs/reward
    python experiments/grpo.py --method dapo --out runs/dapo --reward-dir runs/reward
    python experiments/grpo.py --help                   # every option
"""

from rlhf_jax import launch

if __name__ == "__main__":
    launch.setup()   # before JAX loads: allocator settings and the compile cache (launch.py)

import sys
from pathlib import Path

from rlhf_jax import cli, scripts
from rlhf_jax.stages import online
from rlhf_jax.stages.online import online_config
from rlhf_jax.stages.ppo import PPOConfig


def run(cfg: PPOConfig, out: str | Path) -> dict:
    """The method is PPO's composition (``experiments/ppo.py``) with its preset in ``cfg.ppo``:
    same upstream runs, compiled iteration, loop and held-out evaluation."""
    return scripts.load("ppo").run(cfg, out)


def split_method(argv: list[str], default: str = "grpo") -> tuple[str, list[str]]:
    """``(method, the other flags)`` from ``--method NAME`` among the flags."""
    return online.split_method(argv, default)


def main(argv=None, method: str = "grpo", runner=run, description: str = __doc__) -> dict:
    method, argv = split_method(list(sys.argv[1:] if argv is None else argv), method)
    return cli.main(PPOConfig, runner, argv, description=description,
                    default=online_config(method))


if __name__ == "__main__":
    main()
