"""Critic-free online presets on the compiled PPO iteration: GRPO, Dr. GRPO, RLOO, DAPO, GSPO,
REINFORCE++, RAFT and online DPO.

Budget rule: every online method scores as many samples with the RM per iteration as PPO's default
(64 prompts × 1 sample): here 16 prompts × G = 4 samples (REINFORCE++: 64 × 1). No critic; no
batch whitening of the advantages except REINFORCE++'s (the group baseline replaces both).

* GRPO (Shao et al. 2024): group-normalised advantages, PPO's clipped ratio, per-sequence token
  means (``1/|o_i|``), β = 0.04 times k3 in the loss (k3 as a loss optimises the *forward* KL; see
  ``rlhf_jax.losses.ppo.kl_loss``), 2 epochs × 4 minibatches.
* Dr. GRPO (Liu et al. 2025): GRPO without the std normalisation and with the constant
  ``1/(B·max_new_tokens)`` normaliser instead of ``1/|o_i|``.
* RLOO (Ahmadian et al. 2024): leave-one-out baseline on the sequence reward score − β·Σ_t k1
  (β = 0.05, the KL on the reward side as in PPO), REINFORCE (no ratio), one update per rollout.
* DAPO (Yu et al. 2025, "DAPO: an open-source LLM RL system at scale"): GRPO's group-normalised
  advantages with (1) the decoupled clip ``clip(ρ, 1 − 0.2, 1 + 0.28)``, (2) the token mean over
  every counted token of the (global) minibatch, ``Σ_{i,t} ℓ / Σ_i |o_i|`` (``aggregation =
  "token"``), (3) dynamic sampling: 16 groups sampled and RM-scored, the first 8 with reward spread
  trained on (oversampling factor 2; the discarded half counts against the budget), (4) the soft
  overlong punishment over the last 2 tokens of the budget (DAPO's 4,096 of 20,480 is a fifth; it
  does not fire on the facts world's short answers), and (5) *no KL term* (β = 0), as in the paper.
* GSPO (Zheng et al. 2025): GRPO with the sequence-level ratio
  ``s_i = exp(mean_t log π/π_old)`` clipped per sequence to ``[1 − 3e-4, 1 + 4e-4]``
  (``rlhf_jax.losses.gspo``), mean over sequences; GRPO's β = 0.04 · k3 in the loss is kept.
  ``gspo_token_hparams``: GSPO-token, the same gradient when advantages are per sequence.
* REINFORCE++ (Hu 2025, "REINFORCE++: a simple and efficient approach for aligning large language
  models"): one sample per prompt, per-token k1 KL in the reward (β = 0.05 as PPO), returns-to-go
  with γ = 1 and no critic (GAE with λ = γ = 1 on zero values: A_t = Σ_{s ≥ t} r_s), normalised
  over the global batch (``whiten``: sums and sums of squares psum-ed across devices), PPO's
  clipped surrogate with PPO's 4 epochs × 4 minibatches.
* RAFT (Dong et al. 2023, "RAFT: reward ranked finetuning"; online rejection-sampling fine-tuning,
  as Llama 2's, Touvron et al. 2023, and ReST-EM's, Singh et al. 2023): each iteration samples G
  responses per prompt from the current policy, keeps each prompt's best by the RM
  (``advantage="best"``) and takes SFT steps on the kept ones (REINFORCE with advantage 1: the
  token-mean negative log-likelihood), 2 epochs × 2 minibatches. No KL term by default (β = 0, as
  RAFT); a reward-side β ranks by score − β·Σ_t k1 instead. Every update imitates a sample the
  policy itself drew, so it moves only where the RM's choice among the policy's own samples leads.
* Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback"; TRL's
  online DPO trainer with a reward model as the annotator): 32 prompts × G = 2 fresh samples, the
  RM's better one chosen (``advantage="pair"``; with G > 2 the best against the worst, as Xiong
  et al. 2024's iterative DPO), one DPO step per rollout (β = ``dpo_beta`` 0.1) against the
  frozen reference (``policy_loss="dpo"``). DPO's gradient ∇log π(y_w) − ∇log π(y_l) cancels what
  the two samples share, where RAFT imitates all of the winner.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.rl.hparams import PPOHParams

_ONLINE = dict(prompts_per_iter=16, group_size=4, critic="none", whiten_advantages=False,
               scale_rewards=False)


def _make(base: dict, overrides: dict) -> PPOHParams:
    unknown = set(overrides) - {f.name for f in dataclasses.fields(PPOHParams)}
    if unknown:
        raise TypeError(f"unknown PPOHParams field(s): {sorted(unknown)}")
    return PPOHParams(**{**_ONLINE, **base, **overrides})


_GRPO = dict(advantage="grpo", policy_loss="clipped", loss_aggregation="sequence",
             kl_in_loss="k3", kl_coef=0.04, epochs=2, minibatches=4)


def grpo_hparams(**overrides) -> PPOHParams:
    """GRPO (Shao et al. 2024); keyword overrides of any ``PPOHParams`` field."""
    return _make(_GRPO, overrides)


def dr_grpo_hparams(**overrides) -> PPOHParams:
    """Dr. GRPO (Liu et al. 2025): no std normalisation, constant length normaliser."""
    return _make(dict(_GRPO, advantage="dr_grpo", loss_aggregation="budget"), overrides)


def rloo_hparams(**overrides) -> PPOHParams:
    """RLOO (Ahmadian et al. 2024): leave-one-out REINFORCE, reward-side k1 KL."""
    return _make(dict(advantage="rloo", policy_loss="reinforce", loss_aggregation="budget",
                      kl_estimator="k1", kl_in_loss="", kl_coef=0.05, epochs=1, minibatches=1),
                 overrides)


def dapo_hparams(**overrides) -> PPOHParams:
    """DAPO (Yu et al. 2025): clip-higher, global token mean, dynamic sampling, overlong shaping,
    no KL. The soft overlong punishment is DAPO's only length penalty: PPO's ``no_eos_penalty``
    is off (a response cut at the budget already scores −1 from the ramp; both made it −2)."""
    return _make(dict(_GRPO, loss_aggregation="token", clip_eps=0.2, clip_eps_high=0.28,
                      kl_in_loss="", kl_coef=0.0, keep_groups=8, overlong_buffer=2,
                      no_eos_penalty=0.0), overrides)


def gspo_hparams(**overrides) -> PPOHParams:
    """GSPO (Zheng et al. 2025): sequence-level clipped ratio, GRPO otherwise."""
    return _make(dict(_GRPO, policy_loss="gspo", clip_eps=3e-4, clip_eps_high=4e-4), overrides)


def gspo_token_hparams(**overrides) -> PPOHParams:
    """GSPO-token (Zheng et al. 2025): GSPO's ratio value with per-token gradients."""
    return gspo_hparams(**{"policy_loss": "gspo_token", **overrides})


def reinforce_pp_hparams(**overrides) -> PPOHParams:
    """REINFORCE++ (Hu 2025): k1 in the reward, γ = 1 returns-to-go, global batch
    normalisation, clipped surrogate, no critic."""
    return _make(dict(prompts_per_iter=64, group_size=1, advantage="gae", discount=1.0,
                      gae_lambda=1.0, whiten_advantages=True, kl_estimator="k1", kl_in_loss="",
                      kl_coef=0.05, policy_loss="clipped", loss_aggregation="token"), overrides)


def raft_hparams(**overrides) -> PPOHParams:
    """RAFT / online rejection-sampling fine-tuning (Dong et al. 2023): SFT on each prompt's
    best-of-G sample by the RM."""
    return _make(dict(advantage="best", policy_loss="reinforce", loss_aggregation="token",
                      kl_estimator="k1", kl_in_loss="", kl_coef=0.0, epochs=2, minibatches=2),
                 overrides)


def online_dpo_hparams(**overrides) -> PPOHParams:
    """Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback";
    TRL's online DPO with a reward model): G = 2 fresh samples per prompt, the RM's better one
    chosen, one DPO step (β 0.1) against the frozen reference per rollout; with G > 2 the pair is
    the best and the worst of G (Xiong et al. 2024)."""
    return _make(dict(prompts_per_iter=32, group_size=2, advantage="pair", policy_loss="dpo",
                      dpo_beta=0.1, kl_estimator="k1", kl_in_loss="", kl_coef=0.0, epochs=1,
                      minibatches=1), overrides)


def ppo_hparams(**overrides) -> PPOHParams:
    """PPO's defaults (``PPOHParams()``), for a uniform interface."""
    return PPOHParams(**overrides)


PRESETS = {"ppo": ppo_hparams, "grpo": grpo_hparams, "dr_grpo": dr_grpo_hparams,
           "rloo": rloo_hparams, "dapo": dapo_hparams, "gspo": gspo_hparams,
           "gspo_token": gspo_token_hparams, "reinforce_pp": reinforce_pp_hparams,
           "raft": raft_hparams, "online_dpo": online_dpo_hparams}
