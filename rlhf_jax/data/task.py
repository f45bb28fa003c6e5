"""The interface every task implements: a corpus, prompts, a demonstrator and a hidden gold judge.

A *task* is what the RLHF pipeline trains on. The embedded default is
:class:`rlhf_jax.data.facts_world.FactsWorld`; a researcher plugs in their own by subclassing
:class:`Task` and registering it (:func:`rlhf_jax.tasks.register_task`). The judge is the simulated
person: models never see it; it labels preferences and scores evaluations. The stages know a task
only through this interface.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

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
    score: float                  # gold score (higher is better; the task's best is top_score)
    label: str                    # the judge's verdict, e.g. "correct", "fabricated", "malformed"
    flags: frozenset[str] = frozenset()   # task-specific properties, e.g. {"fabricated"}


class Task:
    """Base of every task. Subclasses set ``name``, ``tokenizer`` and ``top_score`` and implement
    the four methods above the line; the ones below it have defaults a task may override.

    Attributes:
      name: registry name; also names the task's stored preference data set.
      tokenizer: what the models read and write.
      top_score: the judge's best score (a response at it ties with any other there).
      headline: the :meth:`summarize` keys logged along training (``heldout/<key>``) and reported
        for best-of-N (``<key>/best_of_n``); ``gold`` first.
      reported: further :meth:`summarize` keys a comparison of methods records beside the
        headline ones (``stages.compare``).
      kinds: response kinds (values of :meth:`kind`) whose pairs the reward model's agreement with
        the judge is broken down by (``rm/gold_agreement/<a>_vs_<b>``); empty = no breakdown.
      demonstrations: False for a task without a demonstrator (:meth:`demonstration` raises):
        its starting policy is the pretrained model, SFT runs with ``steps = 0``.
    """

    name: str
    tokenizer: Tokenizer
    top_score: float
    headline: tuple[str, ...] = ("gold",)
    reported: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    demonstrations: bool = True

    def pretraining_corpus(self) -> list[str]:
        raise NotImplementedError

    def prompts(self, split: str) -> list[Prompt]:
        """The prompts of ``"train"`` (SFT, preferences, RL) or ``"heldout"`` (evaluation)."""
        raise NotImplementedError

    def demonstration(self, prompt: Prompt, rng: np.random.Generator) -> str:
        raise NotImplementedError

    def judge(self, prompt: Prompt, response: str) -> Judgement:
        raise NotImplementedError

    # --------------------------------------------------------------------------- defaults
    def summarize(self, prompts: Sequence[Prompt], judgements: Sequence[Judgement]
                  ) -> dict[str, float]:
        """Aggregate metrics over responses (``prompts[i]`` is the prompt of ``judgements[i]``):
        ``gold`` (mean gold score) and ``top_rate`` (share of responses at ``top_score``)."""
        check_lengths(prompts, judgements)
        n = max(len(judgements), 1)
        return {"gold": gold_mean(judgements),
                "top_rate": sum(j.score >= self.top_score for j in judgements) / n}

    def kind(self, judgement: Judgement) -> str:
        """The coarse kind of a judged response (one of ``kinds``); default: its label."""
        return judgement.label

    def knowledge_probes(self, split: str) -> list[tuple[str, str]]:
        """``(prefix, single-token answer)`` probes of what a model knows (``knowledge/<policy>``
        in the summaries); default: none."""
        return []


def check_lengths(prompts: Sequence[Prompt], judgements: Sequence[Judgement]) -> None:
    if len(prompts) != len(judgements):
        raise ValueError(f"{len(prompts)} prompts but {len(judgements)} judgements")


def gold_mean(judgements: Sequence[Judgement]) -> float:
    return float(np.mean([j.score for j in judgements])) if judgements else 0.0
