"""Offline preference losses on labelled pairs: DPO, IPO, SimPO, ORPO; K-wise rankings as pairs.

Every loss takes per-pair arrays ``[B]`` of *summed* response log-probabilities (the response
tokens, EOS included) and returns ``(loss, metrics)``; the loss is a mean over pairs weighted by
``mask`` (0 = pair not counted; K-wise rankings give fractional weights), ``Σ m·l / Σ m``
(``mask=None``: every pair 1), reduced globally over ``axis_name`` under
``shard_map``. Write ``h`` for the difference of the policy/reference log-ratios of the chosen
(y_w) and rejected (y_l) response:

    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

* **DPO** (Rafailov et al. 2023, "Direct Preference Optimization"), with conservative label
  smoothing ε (Mitchell 2023, "cDPO": the label is flipped with probability ε):

      l = (1 − ε)·(−log σ(β h)) + ε·(−log σ(−β h))

  Under a Bradley–Terry preference model with reward r the population optimum is
  π*(y) ∝ π_ref(y)·exp(r(y)/β) (for ε = 0).
* **IPO** (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", ΨPO with Ψ = identity):  l = (h − 1/(2τ))². With ``average_length`` each
  log-ratio is divided by its response length first (the length-averaged variant).
  For one pair of responses labelled i ≻ j with probability p_ij the expected loss is minimised at
  h_ij = (p_ij − 1/2)/τ; over a whole bandit the optimum is the weighted least-squares fit of the
  log-ratio differences to these targets.
* **SimPO** (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
  Reward"): reference-free, length-normalised, with a target margin γ = ``simpo_margin``:

      l = −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ)

* **ORPO** (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
  Model"): reference-free, folded into SFT. With the length-normalised log-probability
  ``ℓ(y) = log π(y)/|y|`` and the log odds ``log odds(y) = ℓ(y) − log(1 − exp ℓ(y))``:

      l = −ℓ(y_w) + λ·(−log σ(log odds(y_w) − log odds(y_l)))

  (the first term is the chosen response's per-token NLL, the paper's L_SFT per pair).
  ``log(1 − exp ℓ)`` is computed stably (:func:`log1mexp`); ℓ is capped at −1e-6 so that a
  response of probability 1 gives finite odds.

* **KTO** (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") is
  not a pair loss: each response carries its own binary label (desirable / undesirable). With
  ``r = log π(y|x) − log π_ref(y|x)`` and the reference point ``z = max(0, mean over mismatched
  pairs (x_i, y_j≠i) of log π(y_j|x_i) − log π_ref(y_j|x_i))`` (stop-gradient; the mean is
  global across devices and taken before the clamp):

      v = λ_D·σ(β(r − z)) if desirable,  λ_U·σ(β(z − r)) if undesirable;   l = λ_y − v

  (:func:`kto_loss`; not in ``PREFERENCE_LOSSES``, whose losses take pairs).

K-wise rankings (InstructGPT-style data: K responses per prompt, ranking scores, higher =
preferred, equal = tie, as in :mod:`rlhf_jax.losses.reward` and :mod:`rlhf_jax.data.preferences`)
become pairs with :func:`kwise_pairs`: every one of the C(K, 2) unordered pairs as (winner, loser),
ties dropped (weight 0), each kept pair weighted 1/(number of kept pairs of its prompt) so that
every prompt counts once whatever its K and ties. (The RM's K-wise loss divides by C(K, 2)
instead, so there a prompt with ties counts less; with no ties the two agree.)
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.ops import AxisName, masked_mean, masked_sum_and_count


def _mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return jnp.ones_like(x) if mask is None else mask.astype(x.dtype)


def _pair_metrics(h, chosen_reward, rejected_reward, w, axis_name) -> dict[str, jax.Array]:
    """Weighted accuracy (h > 0), margin and the implicit rewards of both responses."""
    mean = lambda x: masked_mean(x, w, axis_name=axis_name)  # noqa: E731
    return {"accuracy": mean((h > 0).astype(h.dtype)), "margin": mean(h),
            "chosen_reward": mean(chosen_reward), "rejected_reward": mean(rejected_reward)}


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, *, beta: float, label_smoothing: float = 0.0,
             mask: jax.Array | None = None, axis_name: AxisName = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(Conservative) DPO: mean over pairs (weighted by ``mask``) of
    ``(1 − ε)(−log σ(βh)) + ε(−log σ(−βh))``.

    Args are ``[B]`` summed response log-probs of the policy and the reference. Metrics:
    ``loss``, ``accuracy`` (share with h > 0), ``margin`` (mean β·h: the implicit reward margin),
    ``chosen_reward`` / ``rejected_reward`` (mean β·(log π − log π_ref)), all weighted.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    logits = chosen_reward - rejected_reward                          # β h
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
              - label_smoothing * jax.nn.log_sigmoid(-logits))
    w = _mask(losses, mask)
    loss = masked_mean(losses, w, axis_name=axis_name)
    return loss, {"loss": loss,
                  **_pair_metrics(logits, chosen_reward, rejected_reward, w, axis_name)}


def ipo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, *, tau: float, chosen_len: jax.Array | None = None,
             rejected_len: jax.Array | None = None, average_length: bool = False,
             mask: jax.Array | None = None, axis_name: AxisName = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """IPO: mean over pairs (weighted by ``mask``) of ``(h − 1/(2τ))²``; with ``average_length``
    the chosen and rejected log-ratios are divided by ``chosen_len`` / ``rejected_len`` (response
    tokens) first.

    Metrics: ``loss``, ``accuracy`` (h > 0), ``margin`` (mean h), ``chosen_reward`` /
    ``rejected_reward`` (mean log-ratios, length-averaged if so configured).
    """
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    if average_length:
        if chosen_len is None or rejected_len is None:
            raise ValueError("ipo_loss: average_length needs chosen_len and rejected_len")
        chosen = chosen / jnp.maximum(chosen_len, 1)
        rejected = rejected / jnp.maximum(rejected_len, 1)
    h = chosen - rejected
    losses = jnp.square(h - 1.0 / (2.0 * tau))
    w = _mask(losses, mask)
    loss = masked_mean(losses, w, axis_name=axis_name)
    return loss, {"loss": loss, **_pair_metrics(h, chosen, rejected, w, axis_name)}


def simpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, chosen_len: jax.Array,
               rejected_len: jax.Array, *, beta: float, simpo_margin: float,
               mask: jax.Array | None = None, axis_name: AxisName = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimPO: mean over pairs (weighted by ``mask``) of
    ``−log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ)``.

    Reference-free. Metrics: ``loss``, ``accuracy`` (length-normalised reward of the chosen
    response higher), ``margin`` (mean reward difference, before subtracting γ),
    ``chosen_reward`` / ``rejected_reward`` (mean β/|y|·log π(y)).
    """
    chosen_reward = beta * policy_chosen / jnp.maximum(chosen_len, 1)
    rejected_reward = beta * policy_rejected / jnp.maximum(rejected_len, 1)
    diff = chosen_reward - rejected_reward
    losses = -jax.nn.log_sigmoid(diff - simpo_margin)
    w = _mask(losses, mask)
    loss = masked_mean(losses, w, axis_name=axis_name)
    return loss, {"loss": loss,
                  **_pair_metrics(diff, chosen_reward, rejected_reward, w, axis_name)}


def kto_loss(policy_logps: jax.Array, ref_logps: jax.Array, policy_kl_logps: jax.Array,
             ref_kl_logps: jax.Array, desirable: jax.Array, *, beta: float,
             lambda_desirable: float = 1.0, lambda_undesirable: float = 1.0,
             mask: jax.Array | None = None, kl_mask: jax.Array | None = None,
             axis_name: AxisName = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO over ``[B]`` responses with binary labels (see the module docstring).

    ``policy_logps`` / ``ref_logps``: summed response log-probs of each labelled (x, y);
    ``policy_kl_logps`` / ``ref_kl_logps``: the same for the mismatched pairs (x_i, y_j≠i) that
    estimate the reference point (``kl_mask`` marks the real ones); ``desirable``: 1 / 0;
    ``mask``: responses counted. The loss is ``Σ m·(λ_y − v) / Σ m``. Metrics: ``loss``,
    ``kl_ref_point`` (z after the clamp), ``reward_desirable`` / ``reward_undesirable`` (mean r
    of each class), ``desirable_share``, ``accuracy`` (share of responses with r − z on the side
    of their label).
    """
    desirable = desirable.astype(policy_logps.dtype)
    w = _mask(policy_logps, mask)
    kl = jax.lax.stop_gradient(policy_kl_logps - ref_kl_logps)
    z = jnp.maximum(masked_mean(kl, _mask(kl, kl_mask), axis_name=axis_name), 0.0)
    r = policy_logps - ref_logps
    v = jnp.where(desirable > 0, lambda_desirable * jax.nn.sigmoid(beta * (r - z)),
                  lambda_undesirable * jax.nn.sigmoid(beta * (z - r)))
    lam = jnp.where(desirable > 0, lambda_desirable, lambda_undesirable)
    loss = masked_mean(lam - v, w, axis_name=axis_name)
    mean = lambda x, m: masked_mean(x, m, axis_name=axis_name)  # noqa: E731
    right = jnp.where(desirable > 0, r > z, r < z).astype(r.dtype)
    return loss, {"loss": loss, "kl_ref_point": z,
                  "reward_desirable": mean(r, w * desirable),
                  "reward_undesirable": mean(r, w * (1.0 - desirable)),
                  "desirable_share": mean(desirable, w), "accuracy": mean(right, w)}


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 − exp(x))`` for ``x < 0``, accurate at both ends (Mächler 2012): ``log(−expm1 x)``
    for x > −log 2, ``log1p(−exp x)`` below."""
    near_zero = x > -jnp.log(2.0)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0))),
                     jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x))))


def orpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, chosen_len: jax.Array,
              rejected_len: jax.Array, *, orpo_lambda: float, mask: jax.Array | None = None,
              axis_name: AxisName = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ORPO: mean over pairs (weighted by ``mask``) of ``−ℓ(y_w) + λ·(−log σ(log odds(y_w) −
    log odds(y_l)))`` with ``ℓ = log π(y)/|y|`` (see the module docstring).

    Reference-free. Metrics: ``loss``, ``nll`` (mean −ℓ(y_w)), ``odds_ratio_loss``,
    ``accuracy`` (log odds of the chosen response higher), ``margin`` (mean log odds ratio),
    ``chosen_reward`` / ``rejected_reward`` (mean ℓ).
    """
    chosen = jnp.minimum(policy_chosen / jnp.maximum(chosen_len, 1), -1e-6)
    rejected = jnp.minimum(policy_rejected / jnp.maximum(rejected_len, 1), -1e-6)
    log_odds_ratio = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    ratio_losses = -jax.nn.log_sigmoid(log_odds_ratio)
    losses = -chosen + orpo_lambda * ratio_losses
    w = _mask(losses, mask)
    loss = masked_mean(losses, w, axis_name=axis_name)
    return loss, {"loss": loss, "nll": masked_mean(-chosen, w, axis_name=axis_name),
                  "odds_ratio_loss": masked_mean(ratio_losses, w, axis_name=axis_name),
                  **_pair_metrics(log_odds_ratio, chosen, rejected, w, axis_name)}


def kwise_pairs(ranking: jax.Array, mask: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """K-wise rankings ``[P, K]`` (higher = preferred, equal = tie; ``mask [P, K]`` marks present
    responses) -> ``(winner, loser, weight)``, each ``[P, C(K, 2)]``.

    Column m is the m-th unordered pair ``i < j`` (``np.triu_indices(K, 1)`` order), oriented so
    that ``winner`` is the preferred index. Tied or absent pairs get weight 0; the others
    ``1 / (kept pairs of the prompt)``, so each prompt with at least one untied pair sums to 1.
    Static shapes: works under ``jit`` with the ranking as data.
    """
    k = ranking.shape[-1]
    i, j = np.triu_indices(k, 1)
    ri, rj = ranking[:, i], ranking[:, j]
    i_wins = ri > rj
    winner = jnp.where(i_wins, i, j).astype(jnp.int32)
    loser = jnp.where(i_wins, j, i).astype(jnp.int32)
    keep = ri != rj
    if mask is not None:
        keep = keep & (mask[:, i] > 0) & (mask[:, j] > 0)
    keep = keep.astype(jnp.float32)
    weight = keep / jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1.0)
    return winner, loser, weight


PREFERENCE_LOSSES: dict[str, Callable] = {"dpo": dpo_loss, "ipo": ipo_loss, "simpo": simpo_loss,
                                          "orpo": orpo_loss}
# reference-free losses take (policy_chosen, policy_rejected, chosen_len, rejected_len); a new
# one is registered here too (``REFERENCE_FREE.add(name)``): the stage then loads no reference
REFERENCE_FREE: set[str] = {"simpo", "orpo"}


# keyword arguments the stage supplies itself (the rest are a loss's hyperparameters)
STAGE_ARGS = frozenset({"mask", "axis_name", "chosen_len", "rejected_len"})


def _takes(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def hparam_problems(name: str, hparams: dict) -> dict[str, str]:
    """``{hyperparameter: problem}`` of ``PREFERENCE_LOSSES[name]`` called with ``hparams``: a
    name it does not take, or a keyword-only argument without a default that is missing."""
    params = inspect.signature(PREFERENCE_LOSSES[name]).parameters
    takes = sorted(k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and
                   k not in STAGE_ARGS)
    out = {k: f"loss {name!r} takes no argument {k!r} (it takes {takes})" for k in hparams
           if not _takes(PREFERENCE_LOSSES[name], k)}
    out.update({k: f"loss {name!r} needs it (no default)" for k, p in params.items()
                if p.kind is p.KEYWORD_ONLY and p.default is p.empty and k not in hparams
                and k not in STAGE_ARGS})
    return out


def preference_loss(name: str, *, policy_chosen, policy_rejected, ref_chosen=None,
                    ref_rejected=None, chosen_len=None, rejected_len=None, mask=None,
                    axis_name: AxisName = None, **hparams) -> tuple[jax.Array, dict]:
    """Call ``PREFERENCE_LOSSES[name]`` with the arguments it takes (one calling convention for
    the stage): reference log-probs are ignored by reference-free losses, lengths passed to the
    losses that use them; ``hparams`` are that loss's keyword hyperparameters."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; known: {sorted(PREFERENCE_LOSSES)}")
    common = {"mask": mask, "axis_name": axis_name, **hparams}
    if name in REFERENCE_FREE:
        return PREFERENCE_LOSSES[name](policy_chosen, policy_rejected, chosen_len, rejected_len,
                                       **common)
    if _takes(PREFERENCE_LOSSES[name], "chosen_len"):   # IPO's length average, or a new loss's
        common.update(chosen_len=chosen_len, rejected_len=rejected_len)
    return PREFERENCE_LOSSES[name](policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                   **common)


def kwise_preference_loss(name: str, policy_logps: jax.Array, ref_logps: jax.Array | None,
                          lengths: jax.Array, ranking: jax.Array, *,
                          mask: jax.Array | None = None, axis_name: AxisName = None,
                          **hparams) -> tuple[jax.Array, dict]:
    """A pairwise loss over every untied pair of K-wise rankings: ``policy_logps``,
    ``ref_logps``, ``lengths`` and ``ranking`` are ``[P, K]`` (each response forwarded once),
    ``mask [P, K]`` marks present responses; pairs and their weights from :func:`kwise_pairs`, the
    loss a mean over prompts with an untied pair. Metrics add ``pairs`` (untied pairs counted)."""
    winner, loser, weight = kwise_pairs(ranking, mask)
    take = lambda x, idx: jnp.take_along_axis(x, idx, axis=1).reshape(-1)  # noqa: E731
    ref = {} if ref_logps is None else {"ref_chosen": take(ref_logps, winner),
                                        "ref_rejected": take(ref_logps, loser)}
    loss, metrics = preference_loss(
        name, policy_chosen=take(policy_logps, winner), policy_rejected=take(policy_logps, loser),
        chosen_len=take(lengths, winner), rejected_len=take(lengths, loser),
        mask=weight.reshape(-1), axis_name=axis_name, **ref, **hparams)
    _, pairs = masked_sum_and_count(weight, weight > 0, axis_name=axis_name)
    return loss, {**metrics, "pairs": pairs}
