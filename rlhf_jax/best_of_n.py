"""Best-of-n from one pool of samples: the exact best-of-n distribution over a prompt's distinct
responses, its KL to the sampling policy, and its expected scores.

Best-of-n draws n responses from a policy p and keeps the one a reward model scores highest. For a
finite set of distinct responses with probabilities ``p_k`` and scores ``s_k`` (ties broken
uniformly at random), the kept response's distribution is

    q_k = (F(s_k)^n − F⁻(s_k)^n) · p_k / P(s = s_k),

with ``F(s) = P(score ≤ s)`` and ``F⁻(s) = P(score < s)``: the chance that the best of the n
draws lies at score level ``s_k``, shared within the level in proportion to p. The analytic
``log n − (n − 1)/n`` (:func:`kl_bound`) is KL(q ‖ p) when every draw is distinct (a continuous
score distribution) and an upper bound otherwise; a policy whose answers repeat has a smaller KL.

:func:`pool_curve` estimates q for every prompt from a pool of M samples of the policy (``p`` =
each distinct response's share of the pool, the plug-in estimate), and from it the exact KL and
the expected gold and proxy scores of best-of-n for each n. :func:`sample_pool` draws the pool on
the held-out prompts and judges it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from rlhf_jax.evaluate import generate_ids, judge_all, score_groups
from rlhf_jax.sampling import SamplingConfig


def kl_bound(n: int) -> float:
    """log n − (n − 1)/n: KL(best-of-n ‖ p) when the n draws are distinct; an upper bound."""
    return math.log(n) - (n - 1) / n


def bon_distribution(p: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """The best-of-``n`` distribution ``q [K]`` over K distinct responses with probabilities
    ``p [K]`` (summing to 1) and reward scores ``scores [K]``; ties broken uniformly."""
    p = np.asarray(p, np.float64)
    scores = np.asarray(scores, np.float64)
    if p.shape != scores.shape or p.ndim != 1:
        raise ValueError(f"p {p.shape} and scores {scores.shape} must be equal 1-D shapes")
    if np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"p must be a probability vector, got sum {p.sum()}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    levels, level_of = np.unique(scores, return_inverse=True)
    mass = np.bincount(level_of, weights=p, minlength=len(levels))   # P(score = level)
    below = np.cumsum(mass) - mass                                    # P(score < level)
    best = np.minimum(below + mass, 1.0) ** n - below ** n            # P(max of n at level)
    share = np.divide(p, mass[level_of], out=np.zeros_like(p), where=mass[level_of] > 0)
    return best[level_of] * share


def kl(q: np.ndarray, p: np.ndarray) -> float:
    """KL(q ‖ p) of two distributions over the same support (0 · log 0 = 0)."""
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    on = q > 0
    return float(np.sum(q[on] * np.log(q[on] / p[on])))


def distinct(texts: Sequence[str]) -> tuple[list[int], np.ndarray]:
    """The index of each distinct text's first occurrence and its share of ``texts``."""
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
        counts[t] = counts.get(t, 0) + 1
    return list(first.values()), np.asarray([counts[t] for t in first], np.float64) / len(texts)


def pool_curve(texts: Sequence[Sequence[str]], proxy: np.ndarray, gold: np.ndarray,
               ns: Sequence[int]) -> list[dict]:
    """Best-of-n for each n of ``ns`` from a pool: ``texts[i]`` the M sampled responses of prompt
    i, ``proxy [N, M]`` their reward-model scores, ``gold [N, M]`` their gold scores. Per n (means
    over prompts): ``kl`` (exact KL of the plug-in best-of-n distribution to the pool's),
    ``kl_bound``, ``gold`` and ``proxy`` (expected under best-of-n), and ``distinct`` (mean
    number of distinct responses per prompt)."""
    proxy, gold = np.asarray(proxy, np.float64), np.asarray(gold, np.float64)
    if proxy.shape != gold.shape or proxy.shape[0] != len(texts):
        raise ValueError(f"pool shapes differ: {len(texts)} prompts, proxy {proxy.shape}, "
                         f"gold {gold.shape}")
    per_prompt = []
    for i, row in enumerate(texts):
        if len(row) != proxy.shape[1]:
            raise ValueError(f"prompt {i}: {len(row)} responses, expected {proxy.shape[1]}")
        idx, p = distinct(row)
        per_prompt.append((p, proxy[i, idx], gold[i, idx]))
    out = []
    for n in ns:
        kls, golds, proxies = [], [], []
        for p, s, g in per_prompt:
            q = bon_distribution(p, s, n)
            kls.append(kl(q, p))
            golds.append(float(q @ g))
            proxies.append(float(q @ s))
        out.append({"n": int(n), "kl": float(np.mean(kls)), "kl_bound": kl_bound(n),
                    "gold": float(np.mean(golds)), "proxy": float(np.mean(proxies)),
                    "distinct": float(np.mean([len(p) for p, _, _ in per_prompt]))})
    return out


def sample_pool(policy, params, task, shapes, key, *, size: int, chunk: int = 16) -> dict:
    """``size`` samples (T = 1) of ``policy`` for every held-out prompt, judged, ``chunk``
    prompts at a time (chunk c with key ``fold_in(key, c)``), progress shown:
    ``{"uids", "texts" [N][M], "ids" [N][M][·], "gold" [N][M]}`` (JSON-ready lists; ``ids``:
    each response's sampled ids, which :func:`score_pool` scores instead of re-encoding the
    text)."""
    import jax

    from rlhf_jax.progress import Progress

    prompts = task.prompts("heldout")
    sampling = SamplingConfig(max_new_tokens=shapes.max_new_tokens)
    bar = Progress("best-of-n pool", len(prompts))
    texts: list[list[str]] = []
    ids: list[list[list[int]]] = []
    gold: list[list[float]] = []
    for c, start in enumerate(range(0, len(prompts), chunk)):
        part = prompts[start:start + chunk]
        flat, out, out_ids = generate_ids(policy, params, task, part, jax.random.fold_in(key, c),
                                          n_samples=size, sampling=sampling,
                                          prompt_len=shapes.prompt_len)
        scores = [j.score for j in judge_all(task, flat, out)]
        rows = [slice(i * size, (i + 1) * size) for i in range(len(part))]
        texts += [out[r] for r in rows]
        ids += [out_ids[r] for r in rows]
        gold += [scores[r] for r in rows]
        bar.update(start + len(part))
    bar.close()
    return {"uids": [p.uid for p in prompts], "texts": texts, "ids": ids, "gold": gold}


def score_pool(pool: dict, task, shapes, score, rm_params, *, gain: float = 1.0,
               bias: float = 0.0) -> np.ndarray:
    """The reward model's (normalised: ``gain · r + bias``) score of every pool response,
    ``[N, M]``: of its sampled ids where the pool has them and they decode to its text
    (:func:`rlhf_jax.data.batching.response_tokens`), else of its text encoded (a pool stored
    before ids were)."""
    from rlhf_jax.data.batching import encode_groups

    by_uid = {p.uid: p for p in task.prompts("heldout")}
    arrays = encode_groups(task.tokenizer, [by_uid[u] for u in pool["uids"]], pool["texts"],
                           prompt_len=shapes.prompt_len, response_len=shapes.max_new_tokens + 1,
                           ids=pool.get("ids"))
    return gain * score_groups(score, rm_params, arrays) + bias
