"""Held-out evaluation under the gold judge: sample, decode, judge, aggregate.

Protocol (pinned): every held-out prompt, ``n_samples`` (≥ 4) samples each at ``T = 1`` with no
top-k/top-p; sample ``j`` of prompt ``i`` uses example id ``i * n_samples + j``, so two policies
evaluated with the same key are compared pairwise by prompt and sample index.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.batching import encode_prompts, pad_rows
from rlhf_jax.data.task import Judgement, Prompt, Task, summarize
from rlhf_jax.models.functional import Model
from rlhf_jax.sampling import SamplingConfig, sample


@functools.partial(jax.jit, static_argnames=("model", "cfg", "eos_id", "pad_id"))
def _sample_jit(model, params, prompts, mask, key, example_ids, *, cfg, eos_id, pad_id):
    return sample(model, params, prompts, mask, key, cfg=cfg, eos_id=eos_id, pad_id=pad_id,
                  example_ids=example_ids)


def generate(model: Model, params, task: Task, prompts: Sequence[Prompt], key: jax.Array, *,
             n_samples: int, sampling: SamplingConfig, prompt_len: int, batch_size: int = 256
             ) -> tuple[list[Prompt], list[str]]:
    """``n_samples`` responses per prompt (prompt-major order), decoded to text."""
    tok = task.tokenizer
    flat = [p for p in prompts for _ in range(n_samples)]
    ids, mask = encode_prompts(tok, flat, prompt_len)
    texts: list[str] = []
    for start in range(0, len(flat), batch_size):
        sl = slice(start, start + batch_size)
        real = len(ids[sl])  # the last batch is padded so one compiled shape serves all
        b_ids, b_mask = pad_rows(ids[sl], batch_size), pad_rows(mask[sl], batch_size)
        ex = jnp.arange(start, start + batch_size)
        out = _sample_jit(model, params, jnp.asarray(b_ids), jnp.asarray(b_mask), key, ex,
                          cfg=sampling, eos_id=tok.eos_id, pad_id=tok.pad_id)
        toks = np.asarray(out.tokens)[:real]
        texts.extend(tok.decode(row) for row in toks.tolist())
    return flat, texts


def judge_all(task: Task, prompts: Sequence[Prompt], texts: Sequence[str]) -> list[Judgement]:
    return [task.judge(p, t) for p, t in zip(prompts, texts)]


def evaluate_policy(model: Model, params, task: Task, prompts: Sequence[Prompt], key: jax.Array,
                    *, n_samples: int = 4, max_new_tokens: int, prompt_len: int,
                    temperature: float = 1.0) -> tuple[dict[str, float], list[dict]]:
    """Gold metrics of a policy on ``prompts`` (see :func:`rlhf_jax.data.task.summarize`), and one
    record per response (prompt uid, sample index, text, label, score)."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    flat, texts = generate(model, params, task, prompts, key, n_samples=n_samples, sampling=cfg,
                           prompt_len=prompt_len)
    judgements = judge_all(task, flat, texts)
    records = [{"uid": p.uid, "sample": i % n_samples, "response": t, "label": j.label,
                "score": j.score} for i, (p, t, j) in enumerate(zip(flat, texts, judgements))]
    return summarize(flat, judgements), records


def evaluate_demonstrator(task: Task, prompts: Sequence[Prompt], *, n_samples: int, seed: int
                          ) -> dict[str, float]:
    """The same metrics for the task's demonstrator on the same prompts."""
    rng = np.random.default_rng(seed)
    flat = [p for p in prompts for _ in range(n_samples)]
    return summarize(flat, judge_all(task, flat, [task.demonstration(p, rng) for p in flat]))


def probe_accuracy(model: Model, params, tok, probes: Sequence[tuple[str, str]], *,
                   length: int) -> float:
    """Share of ``(prefix, answer)`` probes whose greedy next token after ``[bos] prefix`` is the
    (single-token) answer: what the model *knows*, independent of any answer format."""
    from rlhf_jax.data.batching import pad_left

    ids, mask = pad_left([[tok.bos_id] + tok.encode(p) for p, _ in probes], length, tok.pad_id,
                         what="probe")
    answers = np.asarray([tok.encode(a)[0] for _, a in probes])
    out = jax.jit(model.apply)(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return float(np.mean(np.asarray(jnp.argmax(out.logits[:, -1], -1)) == answers))
