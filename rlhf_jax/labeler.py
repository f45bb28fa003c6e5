"""A simulated labeller: sample K responses per prompt, score them with the hidden gold judge, and
rank them with Plackett–Luce noise of temperature τ.

Plackett–Luce with weights ``exp(g_i / τ)`` is sampled by sorting ``g_i / τ + Gumbel noise``; its
pairwise marginals are exactly Bradley–Terry, ``P(i ≻ j) = σ((g_i − g_j) / τ)``. So no model can
agree with the noisy labels more often than the *noise ceiling*: the mean over pairs with different
gold scores of ``max(p, 1 − p)``, ``p = σ(Δg / τ)``. Identical responses are tied (no person can
prefer one of two identical answers). The noise-free gold scores are kept beside the ranking for
evaluation only.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from rlhf_jax.configs import check
from rlhf_jax.data.task import Prompt, Task
from rlhf_jax.evaluate import generate_ids
from rlhf_jax.sampling import SamplingConfig

# Pinned: with the facts-world judge's score gaps this puts the noise ceiling on SFT-sample pairs
# with different gold scores at ~0.77 (labels about as noisy as people's).
DEFAULT_TAU = 1.5


@dataclasses.dataclass(frozen=True)
class LabelerConfig:
    """Attributes:
      k: responses sampled (at T = 1) and ranked per prompt; all C(k, 2) pairs are labelled.
      tau: Plackett–Luce temperature of the labeller's noise (pinned default, see DEFAULT_TAU).
    """

    k: int = 4
    tau: float = DEFAULT_TAU

    def __post_init__(self):
        check(self.k >= 2, "k", f"needs at least 2 responses per prompt, got {self.k}")
        check(self.tau > 0, "tau", f"must be > 0, got {self.tau}")


def plackett_luce_ranking(gold: np.ndarray, tau: float, rng: np.random.Generator) -> np.ndarray:
    """Noisy ranking scores ``[N, K]`` (higher = preferred; K−1 for the top) of gold ``[N, K]``."""
    noisy = gold / tau + rng.gumbel(size=gold.shape)
    order = np.argsort(-noisy, axis=-1, kind="stable")           # best first
    ranking = np.empty_like(gold, dtype=np.float32)
    k = gold.shape[-1]
    np.put_along_axis(ranking, order, np.arange(k - 1, -1, -1, dtype=np.float32)[None], axis=-1)
    return ranking


def tie_identical(texts: Sequence[Sequence[str]], ranking: np.ndarray) -> np.ndarray:
    """Give identical responses of a prompt the mean of their ranking scores (a tie)."""
    ranking = ranking.copy()
    for i, row in enumerate(texts):
        groups: dict[str, list[int]] = {}
        for j, t in enumerate(row):
            groups.setdefault(t, []).append(j)
        for idx in groups.values():
            if len(idx) > 1:
                ranking[i, idx] = ranking[i, idx].mean()
    return ranking


def pair_indices(k: int) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(k, 1)
    return i, j


def noise_ceiling(gold: np.ndarray, tau: float) -> float:
    """Best achievable agreement with the noisy labels on pairs whose gold scores differ."""
    i, j = pair_indices(gold.shape[-1])
    dg = (gold[:, i] - gold[:, j]).ravel()
    dg = dg[dg != 0]
    if dg.size == 0:
        return float("nan")
    p = 1.0 / (1.0 + np.exp(-dg / tau))
    return float(np.mean(np.maximum(p, 1 - p)))


@dataclasses.dataclass
class Preferences:
    """K-wise preference data: ``responses[i][j]`` is response j to ``prompts[i]``."""

    prompts: list[Prompt]
    responses: list[list[str]]
    ranking: np.ndarray       # [N, K] noisy labels (higher = preferred; equal = tie)
    gold: np.ndarray          # [N, K] noise-free gold scores (evaluation only)
    kinds: list[list[str]]    # the task's kind of each judged response (evaluation only)
    # response_ids[i][j]: the ids response j to prompts[i] was sampled as (None: not known, e.g.
    # a data set stored without them; then its text is encoded)
    response_ids: list[list[list[int]] | None] | None = None

    def records(self) -> list[dict]:
        ids = self.response_ids or [None] * len(self.prompts)
        return [{"id": p.uid, "prompt": p.text, "responses": list(r), "ranking": rk.tolist(),
                 "gold": g.tolist(), **({} if i is None else {"response_ids": i})}
                for p, r, rk, g, i in
                zip(self.prompts, self.responses, self.ranking, self.gold, ids, strict=True)]


def collect_preferences(model, params, task: Task, prompts: Sequence[Prompt], key: jax.Array, *,
                        cfg: LabelerConfig, seed: int, max_new_tokens: int, prompt_len: int
                        ) -> Preferences:
    """Sample ``cfg.k`` responses per prompt from the policy at T = 1 and label them (keeping
    each response's sampled ids)."""
    flat, texts, ids = generate_ids(
        model, params, task, prompts, key, n_samples=cfg.k,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0),
        prompt_len=prompt_len)
    judgements = [task.judge(p, t) for p, t in zip(flat, texts)]
    n = len(prompts)
    gold = np.asarray([j.score for j in judgements], np.float32).reshape(n, cfg.k)
    responses = [texts[i * cfg.k:(i + 1) * cfg.k] for i in range(n)]
    kinds = [[task.kind(j) for j in judgements[i * cfg.k:(i + 1) * cfg.k]] for i in range(n)]
    ranking = plackett_luce_ranking(gold, cfg.tau, np.random.default_rng(seed))
    return Preferences(list(prompts), responses, tie_identical(responses, ranking), gold, kinds,
                       [ids[i * cfg.k:(i + 1) * cfg.k] for i in range(n)])
