"""Unpaired binary feedback (thumbs up / thumbs down) for KTO, from the gold judge with label noise.

Every response of the K-wise comparisons the reward model was trained on gets one label — the same
prompts and the same samples, one label per sample, so KTO and DPO see the same budget. The label
is *desirable* iff the response gets the judge's top score (on the facts world: the correct fact,
or "unknown" about a person who does not exist), *undesirable* otherwise; then each label is
flipped independently with probability ``flip`` (default 0.2, about the pairwise labeller's error
rate on pairs with different gold scores, 1 − noise ceiling ≈ 0.23), from a seeded generator.

Stored as a versioned TFDS data set ``<task>_binary_feedback`` beside the K-wise one, with the same
record schema and builder (:func:`rlhf_jax.data.preferences.build_preference_dataset`): ``ranking``
holds the label (1 = desirable, 0 = undesirable), ``gold`` the judge's score.
"""

from __future__ import annotations

import dataclasses

import numpy as np

VERSION = "1.1.0"   # 1.1.0: the responses' sampled ids (response_ids) kept, as in the K-wise set
DEFAULT_FLIP = 0.2


def dataset_name(task_name: str) -> str:
    return f"{task_name}_binary_feedback"


def binary_feedback(prefs, *, top_score: float, flip: float, seed: int
                    ) -> tuple[object, dict[str, float]]:
    """``prefs`` (a ``rlhf_jax.labeler.Preferences``) with ``ranking`` replaced by noisy binary
    labels ``[N, K]``, and statistics: ``desirable_share`` (after noise), ``gold_top_share``
    (before), ``flipped_share``, counts."""
    if not 0.0 <= flip < 0.5:
        raise ValueError(f"flip must be in [0, 0.5), got {flip}")
    clean = (prefs.gold >= top_score).astype(np.float32)
    flips = np.random.default_rng([seed, 7]).random(clean.shape) < flip
    labels = np.where(flips, 1.0 - clean, clean).astype(np.float32)
    stats = {"responses": int(labels.size), "desirable": int(labels.sum()),
             "undesirable": int(labels.size - labels.sum()),
             "desirable_share": float(labels.mean()), "gold_top_share": float(clean.mean()),
             "flipped_share": float(flips.mean()), "flip": flip}
    return dataclasses.replace(prefs, ranking=labels), stats


def mismatched(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The mismatched pairs KTO's reference point averages over: prompt i with the K responses of
    prompt i + 1 (cyclically), ``kl_responses`` / ``kl_response_mask`` ``[N, K, Lr]``. Built once
    for the whole data set on the host, so the pairs do not depend on batching or devices."""
    return {"kl_responses": np.roll(data["responses"], -1, axis=0),
            "kl_response_mask": np.roll(data["response_mask"], -1, axis=0)}
