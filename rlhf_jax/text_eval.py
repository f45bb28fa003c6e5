"""Evaluation of free text beside a task's judge: diversity (distinct-n) and the perplexity of one
policy's samples under another (how far RLHF text drifted from the starting policy's language).

Both read the response records of :func:`rlhf_jax.evaluate.evaluate_heldout` (``uid``,
``sample``, ``response``); compare policies on equally many records (the pinned protocol samples
``eval_samples`` per held-out prompt for every policy).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.batching import encode_prompts, pad_right, pad_rows, response_tokens
from rlhf_jax.data.task import Task
from rlhf_jax.models.functional import Model
from rlhf_jax.ops import token_logprobs
from rlhf_jax.sampling import response_logits


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, over all ``texts``
    (words = whitespace-separated); 0 when there is no n-gram."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@functools.partial(jax.jit, static_argnames=("model",))
def _nll(model: Model, params, prompts, prompt_mask, responses, mask):
    """Summed negative log-likelihood of the masked response tokens, ``[B]``."""
    logits, _ = response_logits(model, params, prompts, prompt_mask, responses, mask)
    return -jnp.sum(token_logprobs(logits, responses) * mask, -1)


def perplexity_under(model: Model, params, task: Task, records: Sequence[dict], *,
                     prompt_len: int, response_len: int, batch: int = 256) -> float:
    """exp(mean NLL per token) of the records' response tokens under ``model`` — EOS and padding
    excluded — given their held-out prompts: the perplexity of one policy's samples under
    another (e.g. RLHF samples under the starting policy). A response is read as the ids the
    policy sampled (a record's ``response_ids``; for a record stored before them, its text as the
    task's tokenizer encodes it), cut to ``response_len`` tokens."""
    by_uid = {p.uid: p for p in task.prompts("heldout")}
    p_ids, p_mask = encode_prompts(task.tokenizer, [by_uid[r["uid"]] for r in records],
                                   prompt_len)
    tok = task.tokenizer
    # EOS not counted; a response whose canonical re-encoding outgrew the budget keeps its start
    ids = [response_tokens(tok, r["response"], r.get("response_ids"))[:response_len]
           for r in records]
    r_ids, mask = pad_right(ids, response_len, tok.pad_id, what="response")
    total, count = 0.0, int(mask.sum())
    for s in range(0, len(records), batch):
        sl = slice(s, s + batch)
        rows = len(p_ids[sl])
        arrs = [jnp.asarray(pad_rows(a[sl], batch)) for a in (p_ids, p_mask, r_ids, mask)]
        total += float(np.asarray(_nll(model, params, *arrs))[:rows].sum())
    return float(np.exp(total / max(count, 1)))
