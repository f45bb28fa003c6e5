"""The settings of one PPO-family iteration (``PPOHParams``), the policy losses it can use, and
which of its fields the compiled iteration reads as traced inputs (``TRACED``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.configs import check, non_negative, positive
from rlhf_jax.losses.gspo import gspo_loss, gspo_token_loss
from rlhf_jax.losses.policy_gradient import reinforce_loss
from rlhf_jax.losses.ppo import clipped_policy_loss
from rlhf_jax.ops import AGGREGATIONS, KL_ESTIMATORS
from rlhf_jax.rl.advantages import ADVANTAGES
from rlhf_jax.rl.group import CHOSEN_ROWS, GROUP_ADVANTAGES  # registers their estimators

POLICY_LOSSES: dict[str, Callable] = {"clipped": clipped_policy_loss, "reinforce": reinforce_loss,
                                      "gspo": gspo_loss, "gspo_token": gspo_token_loss}
CRITICS = ("separate", "shared", "none")


@dataclasses.dataclass(frozen=True)
class PPOHParams:
    """Algorithm settings of one iteration.

    Attributes:
      prompts_per_iter: prompts sampled per iteration.
      group_size: samples per prompt (G; > 1 for group-relative advantages).
      temperature: sampling temperature, also used when the trainer scores (no top-k/top-p).
      epochs: passes over the rollout.
      minibatches: minibatches per epoch (the rollout's sequences must divide into them).
      clip_eps: policy ratio clip ε (ε_low when ``clip_eps_high`` is set).
      clip_eps_high: the ratio's upper clip ε_high (DAPO's decoupled clip; 0 = ``clip_eps``).
      value_clip_eps: value clip (0 = off).
      vf_coef: value-loss weight when the critic shares the policy trunk.
      discount: GAE discount γ.
      gae_lambda: GAE λ.
      whiten_advantages: normalise advantages to mean 0, std 1 over the batch.
      kl_coef: β, the initial value when adaptive.
      kl_estimator: reward-side per-token KL (``rlhf_jax.ops.kl_per_token``): ``k1`` (default;
        log π − log π_SFT at the sampled token, InstructGPT's) or ``exact`` (full-vocabulary KL
        at each position). A position's exact KL does not depend
        on the token sampled there, so in the reward it only credits earlier tokens; its direct
        gradient at its own position is added to the loss (the decomposition is exact).
      kl_in_loss: put β·KL in the loss instead of the reward (``rlhf_jax.losses.ppo.kl_loss``):
        ``""`` (default: off), ``k2``, ``exact`` or ``iw_k3`` (k3 weighted by π/π_old: the exact
        gradient on π_old's samples; ``k1``/``k3`` allowed for experiments; GRPO uses ``k3``). These two fields are the library's KL defaults; the KL functions
        themselves have none.
      adaptive_kl: Ziegler et al.'s controller on β.
      kl_target: target per-sequence KL (nats) of the controller.
      kl_horizon: controller horizon (in sequences).
      entropy_coef: entropy bonus in the policy loss (default 0: the KL already regularises); the
        controller's initial integral term when adaptive.
      entropy_target: target mean token entropy H* (nats) of the adaptive entropy controller, a
        bounded PI controller (``rlhf_jax.rl.entropy_control``): each iteration, from its
        rollout's mean token entropy H, e = H* − H, c = clip(I + K_p·e, 0, c_max) for its
        updates and I ← clip(I + K_i·e, 0, c_max); 0 = off (the bonus stays ``entropy_coef``).
      entropy_kp: K_p (coefficient per nat).
      entropy_ki: K_i (coefficient per nat per iteration).
      entropy_coef_max: c_max, the bound on the coefficient.
      ptx_coef: γ_ptx, weight of the pretraining-corpus log-likelihood (PPO-ptx; 0 = off).
      no_eos_penalty: subtracted from the score of a response that hits the budget without EOS.
      scale_rewards: divide scores by their running std (the mean is never shifted).
      advantage: advantage estimator (key of ``ADVANTAGES``).
      policy_loss: policy loss (key of ``POLICY_LOSSES``): ``clipped`` (PPO's surrogate) or
        ``reinforce`` (−A·log π, no ratio; RLOO), ``gspo`` / ``gspo_token`` (the sequence-level
        ratio, ``rlhf_jax.losses.gspo``), or ``dpo`` (online DPO, only with ``advantage="pair"``:
        ``rlhf_jax.losses.preference.dpo_loss`` on each group's best and worst sample against the
        frozen reference, β = ``dpo_beta``).
      dpo_beta: DPO's β for ``policy_loss="dpo"`` (``kl_coef`` then only ranks the samples by
        score − β·Σk1, as for ``best``; ``clip_eps`` and ``loss_aggregation`` do not apply, and
        the log-probs are at ``temperature``, as every loss of the iteration).
      keep_groups: DAPO's dynamic sampling (``rlhf_jax.rl.dynamic_sampling``): train on the first
        this many of the ``prompts_per_iter`` sampled groups whose rewards differ (0 = off).
      overlong_buffer: DAPO's soft overlong punishment over the last this many tokens of the
        budget, added to the score (``rlhf_jax.rl.advantages.overlong_penalty``; 0 = off).
      length_debias: remove the RM score's linear dependence on response length over each
        rollout batch before the KL and the advantages (``rlhf_jax.rl.advantages.length_residual``):
        no reward for lengthening (or shortening) a response as such.
      sample_from: who samples the rollouts: ``policy`` (default; on-policy) or ``reference``
        (the frozen SFT policy; only with ``advantage="best"``: each iteration then fine-tunes on
        fresh best-of-G samples of the starting policy, i.e. distils a fixed best-of-G
        distribution instead of iterating on the policy's own samples; or ``"pair"``: DPO on
        the RM's best and worst of the start's G samples; ``rollout/logprob_*_diff`` then
        measure the policy's distance from the reference on those samples, and so do the
        rollouts' ``kl/*`` and the ``kl_stop`` they feed: KLs along the reference's samples, not
        the policy's own; the held-out evaluation's KL is the policy's).
      loss_aggregation: how token terms of the policy loss and a loss-side KL are averaged:
        ``token`` (over all tokens), ``sequence`` (per-sequence token means, GRPO) or ``budget``
        (token sum / (sequences · max_new_tokens), Dr. GRPO); see
        ``rlhf_jax.ops.aggregate``.
      critic: ``separate``, ``shared`` or ``none``.
      rescore_policy: π_old's log-probs (and a shared value head) from a full forward pass of the
        policy over each rollout (default), or — ``False`` — from the logits the sampler computed
        while decoding, as TRL's PPO does: one policy forward pass fewer per iteration, equal up
        to float rounding (``rollout/logprob_max_diff`` / ``logprob_mean_diff`` then compare two
        computations from the same logits, ~0, and no longer check the sampler against a forward
        pass). bf16 runs need the default: π_old then comes from the same code path as π_SFT.
      tis_cap: truncated importance sampling (Yao et al. 2025; 0 = off, the default): each
        token's policy-gradient term is multiplied by min(π_old / π_sampler, ``tis_cap``),
        detached (``rlhf_jax.losses.policy_gradient.tis_weights``), correcting for a sampler
        whose log-probs differ from the trainer's (bf16, another kernel). Needs
        ``rescore_policy``; Yao et al. use 2.
    """

    prompts_per_iter: int = 64
    group_size: int = 1
    temperature: float = 1.0
    epochs: int = 4
    minibatches: int = 4
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5
    discount: float = 1.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = True
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_in_loss: str = ""
    adaptive_kl: bool = False
    kl_target: float = 1.0
    kl_horizon: float = 10000.0
    entropy_coef: float = 0.0
    entropy_target: float = 0.0
    entropy_kp: float = 1.0
    entropy_ki: float = 0.1
    entropy_coef_max: float = 0.1
    ptx_coef: float = 0.0
    no_eos_penalty: float = 1.0
    scale_rewards: bool = False
    advantage: str = "gae"
    policy_loss: str = "clipped"
    critic: str = "separate"
    loss_aggregation: str = "token"
    rescore_policy: bool = True
    tis_cap: float = 0.0
    clip_eps_high: float = 0.0
    keep_groups: int = 0
    overlong_buffer: int = 0
    length_debias: bool = False
    sample_from: str = "policy"
    dpo_beta: float = 0.1

    def __post_init__(self):
        positive(self, "prompts_per_iter", "group_size", "temperature", "epochs", "minibatches",
                 "kl_target", "kl_horizon")
        non_negative(self, "clip_eps", "value_clip_eps", "vf_coef", "kl_coef", "entropy_coef",
                     "ptx_coef", "no_eos_penalty", "tis_cap", "entropy_target", "entropy_kp",
                     "entropy_ki", "entropy_coef_max", "clip_eps_high", "keep_groups",
                     "overlong_buffer", "dpo_beta")
        check(not self.entropy_target or self.entropy_coef <= self.entropy_coef_max,
              "entropy_coef", f"the controller's initial coefficient {self.entropy_coef} exceeds "
              f"its bound entropy_coef_max={self.entropy_coef_max}")
        check(not self.keep_groups or (self.keep_groups <= self.prompts_per_iter and
                                       self.group_size >= 2 and
                                       self.keep_groups * self.group_size % self.minibatches == 0),
              "keep_groups", f"dynamic sampling keeps whole groups (group_size >= 2) of the "
              f"{self.prompts_per_iter} sampled, in a multiple of minibatches={self.minibatches}"
              f" rows; got {self.keep_groups} × {self.group_size}")
        check(0.0 <= self.discount <= 1.0, "discount", "must be in [0, 1]")
        check(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", "must be in [0, 1]")
        check(self.kl_estimator in ("k1", "exact"), "kl_estimator",
              f"reward-side KL must be 'k1' or 'exact', got {self.kl_estimator!r}")
        check(self.kl_in_loss in ("",) + KL_ESTIMATORS, "kl_in_loss",
              f"must be '' or one of {KL_ESTIMATORS}, got {self.kl_in_loss!r}")
        check(self.advantage in ADVANTAGES, "advantage",
              f"unknown {self.advantage!r}; choose one of {sorted(ADVANTAGES)}")
        check(self.policy_loss in POLICY_LOSSES or self.policy_loss == "dpo", "policy_loss",
              f"unknown {self.policy_loss!r}; choose one of {sorted(POLICY_LOSSES) + ['dpo']}")
        check((self.advantage == "pair") == (self.policy_loss == "dpo"), "policy_loss",
              "online DPO pairs each group's best and worst sample: advantage='pair' goes with "
              f"policy_loss='dpo' and only with it, got {self.advantage!r} / "
              f"{self.policy_loss!r}")
        check(self.advantage != "pair" or (self.critic == "none" and not self.kl_in_loss and
                                           self.dpo_beta > 0),
              "advantage", "online DPO ('pair') learns from its pairs alone: critic='none', no "
              "kl_in_loss (DPO's β regularises towards the reference) and dpo_beta > 0")
        check(self.loss_aggregation in AGGREGATIONS, "loss_aggregation",
              f"must be one of {AGGREGATIONS}, got {self.loss_aggregation!r}")
        check(self.advantage not in GROUP_ADVANTAGES or self.group_size >= 2, "group_size",
              f"the {self.advantage!r} advantage compares samples of a prompt: needs group_size "
              f">= 2, got {self.group_size}")
        check(not self.tis_cap or self.rescore_policy, "tis_cap",
              "truncated importance sampling weighs the sampler against the trainer's forward "
              "pass; with rescore_policy=False π_old is the sampler's own, so set "
              "rescore_policy=True or tis_cap=0")
        check(self.policy_loss != "gspo" or self.loss_aggregation == "sequence",
              "loss_aggregation", "GSPO averages over sequences: use 'sequence'")
        check(self.critic in CRITICS, "critic", f"must be one of {CRITICS}, got {self.critic!r}")
        check(self.advantage not in CHOSEN_ROWS or not (self.keep_groups or
                                                              self.whiten_advantages),
              "advantage", f"{self.advantage!r} trains on chosen rows of each group: it takes "
              "neither keep_groups nor whiten_advantages")
        check(self.advantage not in CHOSEN_ROWS or self.kl_estimator == "k1",
              "kl_estimator", f"{self.advantage!r}'s β only ranks the samples (score − β·Σk1); "
              "an exact reward-side KL would also add β·KL to its loss: use 'k1'")
        check(self.advantage != "pair" or not self.tis_cap, "tis_cap",
              "online DPO's loss has no per-token policy-gradient terms to weigh: set "
              "tis_cap=0")
        check(self.sample_from in ("policy", "reference"), "sample_from",
              f"must be 'policy' or 'reference', got {self.sample_from!r}")
        check(self.sample_from == "policy" or (self.advantage in CHOSEN_ROWS and
                                               self.rescore_policy),
              "sample_from", "the reference's samples are off-policy: only the 'best' advantage "
              "(SFT on the winners) or 'pair' (DPO on best vs worst), neither with a ratio, "
              "trains on them, with rescore_policy=True")
        check(self.rollout_size % self.minibatches == 0, "minibatches",
              f"the rollout's {self.rollout_size} sequences (prompts_per_iter × group_size) do "
              f"not divide into {self.minibatches} minibatches")
        check(self.train_rows % self.minibatches == 0, "minibatches",
              f"the {self.train_rows} trained sequences per iteration do not divide into "
              f"{self.minibatches} minibatches")

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_iter * self.group_size

    @property
    def train_rows(self) -> int:
        """Rows trained on per iteration: DAPO's kept groups' sequences, ``best``'s one winner
        per prompt, ``pair``'s one (best, worst) pair per prompt, or the whole rollout."""
        if self.keep_groups:
            return self.keep_groups * self.group_size
        return (self.prompts_per_iter if self.advantage in CHOSEN_ROWS
                else self.rollout_size)

    def scalars(self) -> dict[str, jax.Array]:
        """The :data:`TRACED` fields as float32 arrays (``PPOState.hparams``)."""
        return {k: jnp.asarray(getattr(self, k), jnp.float32) for k in TRACED}


# Fields the compiled iteration reads as traced inputs (``PPOState.hparams``), not as constants:
# configs that differ only in these share one compiled program (a sweep over them compiles once).
# Zero switches a term off in the program's structure, so 0 ↔ non-zero does recompile for
# ``ptx_coef``, ``tis_cap``, ``entropy_target`` and the entropy bonus (``entropy_coef``). β and the
# entropy coefficient are traced too, as state (``PPOState.kl_coef``, ``entropy_coef``). Every other
# field (shapes, epochs, minibatches, estimators, booleans, temperature, and ``value_clip_eps``, on
# which the value loss branches) is static.
TRACED = ("clip_eps", "vf_coef", "discount", "gae_lambda", "kl_target", "kl_horizon", "ptx_coef",
          "no_eos_penalty", "tis_cap", "entropy_target", "entropy_kp", "entropy_ki",
          "entropy_coef_max")
