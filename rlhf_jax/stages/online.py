"""Online RL stage configs: PPO and every critic-free preset (GRPO, Dr. GRPO, RLOO, DAPO, GSPO,
GSPO-token, REINFORCE++, RAFT, online DPO), all run by ``experiments/ppo.py``'s ``run``
(``rlhf_jax.scripts.load("ppo").run``).

``online_config(method)`` is a :class:`PPOConfig` whose ``ppo`` field is the method's preset
(:mod:`rlhf_jax.rl.presets`) and whose policy learning rate suits the method's number of updates
per iteration; everything else (upstream runs, iterations, evaluation, summary keys ``gold/rlhf``
…) is PPO's.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.rl.presets import PRESETS
from rlhf_jax.stages.ppo import PPOConfig

METHODS = tuple(PRESETS)   # ppo, grpo, …, reinforce_pp, raft, online_dpo

# policy learning rate per method (PPO's default otherwise): RLOO makes one update per
# iteration (PPO 16, GRPO 8), so it takes larger steps
LEARNING_RATES = {"rloo": 2e-4}


def online_config(method: str, ppo: PPOConfig = PPOConfig(), **overrides) -> PPOConfig:
    """``ppo`` with its algorithm replaced by ``method``'s preset; ``overrides`` are fields of
    ``PPOHParams`` applied on top of the preset (e.g. ``kl_coef=0.1``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    hp = PRESETS[method](**overrides)
    optim = ppo.policy_optim
    if method in LEARNING_RATES:
        optim = dataclasses.replace(optim, learning_rate=LEARNING_RATES[method])
    updates = ppo.iterations * hp.epochs * hp.minibatches
    if optim.warmup_steps > updates:
        optim = dataclasses.replace(optim, warmup_steps=updates)
    return dataclasses.replace(ppo, ppo=hp, policy_optim=optim,
                               value_optim=dataclasses.replace(
                                   ppo.value_optim,
                                   warmup_steps=min(ppo.value_optim.warmup_steps, updates)))


def split_method(argv: list[str], default: str, choices: tuple[str, ...] = METHODS
                 ) -> tuple[str, list[str]]:
    """``(method, the other flags)`` from ``--method NAME`` (or ``--method=NAME``) anywhere
    among a script's flags."""
    at = [i for i, a in enumerate(argv) if a == "--method" or a.startswith("--method=")]
    if not at:
        return default, list(argv)
    i = at[0]
    joined = argv[i].startswith("--method=")
    method = argv[i].split("=", 1)[1] if joined else (argv[i + 1] if i + 1 < len(argv) else "")
    if len(at) > 1 or method not in choices:
        raise SystemExit(f"error: --method (once) must be one of {', '.join(choices)}")
    return method, [*argv[:i], *argv[i + (1 if joined else 2):]]


__all__ = ["METHODS", "online_config", "split_method"]
