"""Critic-free online presets on the compiled PPO iteration: GRPO, Dr. GRPO and RLOO.

Budget rule: every online method scores as many samples with the RM per iteration as PPO's default
(64 prompts × 1 sample): here 16 prompts × G = 4 samples. No critic, no batch whitening of the
advantages (the group baseline replaces both).

* GRPO (Shao et al. 2024): group-normalised advantages, PPO's clipped ratio, per-sequence token
  means (``1/|o_i|``), β = 0.04 times k3 in the loss (k3 as a loss optimises the *forward* KL; see
  ``rlhf_jax.losses.ppo.kl_loss``), 2 epochs × 4 minibatches.
* Dr. GRPO (Liu et al. 2025): GRPO without the std normalisation and with the constant
  ``1/(B·max_new_tokens)`` normaliser instead of ``1/|o_i|``.
* RLOO (Ahmadian et al. 2024): leave-one-out baseline on the sequence reward score − β·Σ_t k1
  (β = 0.05, the KL on the reward side as in PPO), REINFORCE (no ratio), one update per rollout.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.rl.ppo import PPOHParams

_ONLINE = dict(prompts_per_iter=16, group_size=4, critic="none", whiten_advantages=False,
               scale_rewards=False)


def _make(base: dict, overrides: dict) -> PPOHParams:
    unknown = set(overrides) - {f.name for f in dataclasses.fields(PPOHParams)}
    if unknown:
        raise TypeError(f"unknown PPOHParams field(s): {sorted(unknown)}")
    return PPOHParams(**{**_ONLINE, **base, **overrides})


def grpo_hparams(**overrides) -> PPOHParams:
    """GRPO (Shao et al. 2024); keyword overrides of any ``PPOHParams`` field."""
    return _make(dict(advantage="grpo", policy_loss="clipped", loss_aggregation="sequence",
                      kl_in_loss="k3", kl_coef=0.04, epochs=2, minibatches=4), overrides)


def dr_grpo_hparams(**overrides) -> PPOHParams:
    """Dr. GRPO (Liu et al. 2025): no std normalisation, constant length normaliser."""
    return _make(dict(advantage="dr_grpo", policy_loss="clipped", loss_aggregation="budget",
                      kl_in_loss="k3", kl_coef=0.04, epochs=2, minibatches=4), overrides)


def rloo_hparams(**overrides) -> PPOHParams:
    """RLOO (Ahmadian et al. 2024): leave-one-out REINFORCE, reward-side k1 KL."""
    return _make(dict(advantage="rloo", policy_loss="reinforce", loss_aggregation="budget",
                      kl_estimator="k1", kl_in_loss="", kl_coef=0.05, epochs=1, minibatches=1),
                 overrides)


def ppo_hparams(**overrides) -> PPOHParams:
    """PPO's defaults (``PPOHParams()``), for a uniform interface."""
    return PPOHParams(**overrides)


PRESETS = {"ppo": ppo_hparams, "grpo": grpo_hparams, "dr_grpo": dr_grpo_hparams,
           "rloo": rloo_hparams}
