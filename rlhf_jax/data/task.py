"""The interface every task implements: a corpus, prompts, a demonstrator and a hidden gold judge.

A *task* is what the RLHF pipeline trains on. The embedded default is
:class:`rlhf_jax.data.facts_world.FactsWorld`; a researcher swaps in their own by implementing
:class:`Task`. The judge is the simulated person: models never see it; it labels preferences and
scores evaluations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from rlhf_jax.data.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class Prompt:
    uid: str                      # stable identifier, e.g. "heldout/aldric_voss/home/1"
    text: str                     # what the model sees
    answerable: bool              # does a true answer exist (hidden from the model)
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # hidden task facts


@dataclasses.dataclass(frozen=True)
class Judgement:
    score: float                  # gold score (higher is better)
    label: str                    # e.g. "correct", "honest_unknown", "fabricated", "malformed"
    correct: bool                 # the best possible answer
    fabricated: bool              # states a false or invented fact
    says_unknown: bool            # declines to answer


class Task(Protocol):
    name: str
    tokenizer: Tokenizer
    top_score: float              # the judge's best score

    def pretraining_corpus(self) -> list[str]: ...
    def prompts(self, split: str) -> list[Prompt]: ...
    def demonstration(self, prompt: Prompt, rng: np.random.Generator) -> str: ...
    def judge(self, prompt: Prompt, response: str) -> Judgement: ...


def summarize(prompts: Sequence[Prompt], judgements: Sequence[Judgement]) -> dict[str, float]:
    """Aggregate metrics over responses (``prompts[i]`` is the prompt of ``judgements[i]``).

    - ``gold``: mean gold score;
    - ``fabrication_rate``: share of all responses that state a false or invented fact;
    - ``accuracy``: share of correct responses among those to answerable prompts;
    - ``unknown_rate``: share of all responses that decline ("unknown");
    - ``top_rate``: share of responses at the judge's best (correct) answer;
    - ``malformed_rate``: share of responses the judge cannot parse.
    """
    if len(prompts) != len(judgements):
        raise ValueError(f"{len(prompts)} prompts but {len(judgements)} judgements")
    n = max(len(judgements), 1)
    answerable = [j for p, j in zip(prompts, judgements) if p.answerable]
    return {
        "gold": float(np.mean([j.score for j in judgements])) if judgements else 0.0,
        "fabrication_rate": sum(j.fabricated for j in judgements) / n,
        "accuracy": sum(j.correct for j in answerable) / max(len(answerable), 1),
        "unknown_rate": sum(j.says_unknown for j in judgements) / n,
        "top_rate": sum(j.correct for j in judgements) / n,
        "malformed_rate": sum(j.label == "malformed" for j in judgements) / n,
    }
