"""Held-out evaluation under the gold judge: the one home of the pinned protocol, for any task.

Protocol (pinned): every held-out prompt of the task, ``eval_samples`` (≥ 4) samples each at
``T = 1`` with no top-k/top-p; sample ``j`` of prompt ``i`` uses example id ``i * n + j``, so two
policies evaluated with the same key are compared pairwise by prompt and sample index
(:func:`paired_outcomes`: win / tie / loss under the gold judge). A policy's distance from its
starting point is the exact full-vocabulary KL summed over each of its own responses
(:func:`sequence_kl`); best-of-N reranks N fresh samples per (prompt, sample index) with a reward
model's score function (:func:`best_of_n`). Metrics are the task's own (``Task.summarize``).

A *score function* ``score(params, tokens, mask) -> [B]`` rates ``[prompt | response]`` rows
(prompt left-padded to the task's ``prompt_len``, response right-padded); stages build it beside
the reward model (``rlhf_jax.stages.reward_model.make_score_fn``) and pass it in jitted.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.batching import (encode_groups, encode_prompts, encode_responses, pad_left,
                                    pad_rows)
from rlhf_jax.data.task import Judgement, Prompt, Task
from rlhf_jax.data.tokenizers import response_ids, stop_ids, with_bos
from rlhf_jax.losses.ppo import kl_per_token
from rlhf_jax.models.functional import Model
from rlhf_jax.parallel import single_device
from rlhf_jax.runs import RunDir
from rlhf_jax.sampling import SamplingConfig, response_logits, sample

if TYPE_CHECKING:   # only its shapes are read: prompt_len, max_new_tokens, eval_samples
    from rlhf_jax.tasks import TaskConfig

ScoreFn = Callable[..., jax.Array]   # (params, tokens [B, T], mask [B, T]) -> [B]


@functools.partial(jax.jit, static_argnames=("model", "cfg", "eos_id", "pad_id"))
def _sample_jit(model, params, prompts, mask, key, example_ids, *, cfg, eos_id, pad_id):
    return sample(model, params, prompts, mask, key, cfg=cfg, eos_id=eos_id, pad_id=pad_id,
                  example_ids=example_ids)


def generate_ids(model: Model, params, task: Task, prompts: Sequence[Prompt], key: jax.Array, *,
                 n_samples: int, sampling: SamplingConfig, prompt_len: int, batch_size: int = 256
                 ) -> tuple[list[Prompt], list[str], list[list[int]]]:
    """``n_samples`` responses per prompt (prompt-major order): the prompts, the responses decoded
    to text, and each response's sampled ids (its :func:`~rlhf_jax.data.tokenizers.response_ids`:
    every id before EOS)."""
    tok = task.tokenizer
    flat = [p for p in prompts for _ in range(n_samples)]
    ids, mask = encode_prompts(tok, flat, prompt_len)
    texts: list[str] = []
    sampled: list[list[int]] = []
    for start in range(0, len(flat), batch_size):
        sl = slice(start, start + batch_size)
        real = len(ids[sl])  # the last batch is padded so one compiled shape serves all
        b_ids, b_mask = pad_rows(ids[sl], batch_size), pad_rows(mask[sl], batch_size)
        ex = jnp.arange(start, start + batch_size)
        out = _sample_jit(model, params, jnp.asarray(b_ids), jnp.asarray(b_mask), key, ex,
                          cfg=sampling, eos_id=stop_ids(tok), pad_id=tok.pad_id)
        toks = np.asarray(out.tokens)[:real].tolist()
        texts.extend(tok.decode(row) for row in toks)
        sampled.extend(response_ids(tok, row) for row in toks)
    return flat, texts, sampled


def judge_all(task: Task, prompts: Sequence[Prompt], texts: Sequence[str]) -> list[Judgement]:
    return [task.judge(p, t) for p, t in zip(prompts, texts)]


def _records(prompts, texts, judgements, n_samples: int, ids) -> list[dict]:
    """One record per response; ``response_ids`` are its sampled ids, so a recomputation in
    another process (held-out KL, perplexity, RM agreement) reads the tokens the policy sampled,
    not its text's canonical encoding (:func:`~rlhf_jax.data.batching.response_tokens`)."""
    return [{"uid": p.uid, "sample": i % n_samples, "response": t, "response_ids": list(r),
             "label": j.label, "score": j.score}
            for i, (p, t, r, j) in enumerate(zip(prompts, texts, ids, judgements, strict=True))]


def stored_ids(records: Sequence[dict]) -> list[list[int] | None]:
    """Each record's sampled ids (None for a record written before they were stored)."""
    return [r.get("response_ids") for r in records]


def evaluate_policy(model: Model, params, task: Task, prompts: Sequence[Prompt], key: jax.Array,
                    *, n_samples: int = 4, max_new_tokens: int, prompt_len: int,
                    temperature: float = 1.0) -> tuple[dict[str, float], list[dict]]:
    """The task's metrics (``Task.summarize``) of a policy on ``prompts``, and one record per
    response (prompt uid, sample index, text, sampled ids, label, score)."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    flat, texts, ids = generate_ids(model, params, task, prompts, key, n_samples=n_samples,
                                    sampling=cfg, prompt_len=prompt_len)
    judgements = judge_all(task, flat, texts)
    return task.summarize(flat, judgements), _records(flat, texts, judgements, n_samples, ids)


def evaluate_demonstrator(task: Task, prompts: Sequence[Prompt], *, n_samples: int, seed: int
                          ) -> dict[str, float]:
    """The same metrics for the task's demonstrator on the same prompts."""
    rng = np.random.default_rng(seed)
    flat = [p for p in prompts for _ in range(n_samples)]
    return task.summarize(flat, judge_all(task, flat, [task.demonstration(p, rng) for p in flat]))


def probe_accuracy(model: Model, params, tok, probes: Sequence[tuple[str, str]], *,
                   length: int) -> float:
    """Share of ``(prefix, answer)`` probes whose greedy next token after ``[bos] prefix`` is the
    (single-token) answer: what the model *knows*, independent of any answer format."""
    ids, mask = pad_left([with_bos(tok, tok.encode(p)) for p, _ in probes], length, tok.pad_id,
                         what="probe")
    answers = np.asarray([tok.encode(a)[0] for _, a in probes])
    out = jax.jit(model.apply)(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return float(np.mean(np.asarray(jnp.argmax(out.logits[:, -1], -1)) == answers))


# ----------------------------------------------------------------------------- the protocol
def _heldout(model: Model, params, task: Task, shapes: TaskConfig, key: jax.Array):
    return evaluate_policy(model, params, task, task.prompts("heldout"), key,
                           n_samples=shapes.eval_samples, max_new_tokens=shapes.max_new_tokens,
                           prompt_len=shapes.prompt_len)


def evaluate_heldout(model: Model, params, task: Task, shapes: TaskConfig, key: jax.Array, *,
                     run: RunDir | None = None, name: str) -> tuple[dict[str, float], list[dict]]:
    """A policy on the held-out prompts under the pinned protocol: metric keys suffixed
    ``/<name>``, and the response records (written to ``samples_<name>.jsonl`` of ``run``)."""
    metrics, records = _heldout(model, params, task, shapes, key)
    if run is not None:
        run.write_jsonl(f"samples_{name}.jsonl", records)
    return {f"{k}/{name}": v for k, v in metrics.items()}, records


@functools.partial(jax.jit, static_argnames=("policy", "ref"))
def _sequence_kl(policy: Model, policy_params, ref: Model, ref_params, prompts, prompt_mask,
                 responses, mask):
    """Per-sequence sum of the exact full-vocabulary KL(π ‖ π_ref) over response tokens, ``[B]``."""
    logits, _ = response_logits(policy, policy_params, prompts, prompt_mask, responses, mask)
    ref_logits, _ = response_logits(ref, ref_params, prompts, prompt_mask, responses, mask)
    kl = kl_per_token(None, None, estimator="exact", logits=logits, ref_logits=ref_logits)
    return jnp.sum(kl * mask, -1)


def sequence_kl(policy: Model, params, ref: Model, ref_params, task: Task, shapes: TaskConfig,
                records: Sequence[dict], *, batch: int = 256) -> np.ndarray:
    """Exact KL(π ‖ π_ref) of each held-out record's response, summed over the positions the
    sampler counted (its tokens and EOS; a response cut at the budget has no EOS), ``[R]``. A
    record stored before its sampled ids is read as its text's canonical encoding, cut to the
    budget like a sampled response."""
    params, ref_params = single_device((params, ref_params))   # e.g. sharded policy, local ref
    by_uid = {p.uid: p for p in task.prompts("heldout")}
    p_ids, p_mask = encode_prompts(task.tokenizer, [by_uid[r["uid"]] for r in records],
                                   shapes.prompt_len)
    r_ids, r_mask = encode_responses(task.tokenizer, [r["response"] for r in records],
                                     shapes.max_new_tokens + 1, cut=True,
                                     ids=stored_ids(records))
    # a response cut at the budget was sampled without EOS: the EOS appended after its
    # max_new_tokens tokens is no position the sampler (or the training metric) counted
    r_mask[:, shapes.max_new_tokens:] = 0
    out = []
    for s in range(0, len(records), batch):
        sl = slice(s, s + batch)
        rows = len(p_ids[sl])
        arrs = [jnp.asarray(pad_rows(a[sl], batch)) for a in (p_ids, p_mask, r_ids, r_mask)]
        out.append(np.asarray(_sequence_kl(policy, params, ref, ref_params, *arrs))[:rows])
    return np.concatenate(out)


def paired_outcomes(ours: list[dict], theirs: list[dict], top_score: float) -> dict[str, float]:
    """Win/tie/loss of ``ours`` vs ``theirs`` paired by (prompt uid, sample index) under the gold
    judge, and the win rate a perfect policy would get against ``theirs``."""
    key = lambda r: (r["uid"], r["sample"])  # noqa: E731
    by_key = {key(r): r["score"] for r in theirs}
    unmatched = [key(r) for r in ours if key(r) not in by_key]
    if unmatched:
        raise ValueError(f"{len(unmatched)} of {len(ours)} records have no (uid, sample) partner "
                         f"among the {len(theirs)} they are compared with, e.g. {unmatched[0]}: "
                         "both sides must be sampled from the same prompts, samples_per_prompt "
                         "times each")
    diffs = np.asarray([r["score"] - by_key[key(r)] for r in ours])
    wins, ties, losses = (int(np.sum(diffs > 0)), int(np.sum(diffs == 0)), int(np.sum(diffs < 0)))
    n = max(len(diffs), 1)
    theirs_scores = np.asarray([r["score"] for r in theirs])
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": (wins + ties / 2) / n,
            "ceiling": float(np.mean(np.where(theirs_scores < top_score, 1.0, 0.5)))}


def versus_summary(pair: dict[str, float], vs: str) -> dict[str, float]:
    """Summary keys of a paired comparison ``vs`` (e.g. ``rlhf_vs_sft``)."""
    return {f"win_rate/{vs}": pair["win_rate"], f"wins/{vs}": pair["wins"],
            f"ties/{vs}": pair["ties"], f"losses/{vs}": pair["losses"],
            f"wins_over_decisive/{vs}": pair["wins"] / max(pair["wins"] + pair["losses"], 1)}


class Versus(NamedTuple):
    ref_metrics: dict[str, float]       # keys ``<metric>/<ref_name>``
    metrics: dict[str, float]           # keys ``<metric>/<name>``
    ref_records: list[dict]
    records: list[dict]
    pair: dict[str, float]              # paired_outcomes(records, ref_records)
    kl: np.ndarray                      # [R] exact KL to the reference of each response


def versus_reference(policy: Model, params, ref: Model, ref_params, task: Task,
                     shapes: TaskConfig, key: jax.Array, *, run: RunDir | None, name: str,
                     ref_name: str = "sft") -> Versus:
    """The final held-out evaluation: the reference policy (the starting point) and ``params``
    with the same key (samples written as ``samples_<ref_name>/<name>.jsonl``), paired by
    prompt and sample index, and the exact KL to the reference of the policy's samples.
    Both parameter trees are evaluated on one device (:func:`rlhf_jax.parallel.single_device`),
    wherever the training stage left them."""
    params, ref_params = single_device((params, ref_params))
    ref_m, ref_rec = evaluate_heldout(ref, ref_params, task, shapes, key, run=run, name=ref_name)
    pol_m, pol_rec = evaluate_heldout(policy, params, task, shapes, key, run=run, name=name)
    kl = sequence_kl(policy, params, ref, ref_params, task, shapes, pol_rec)
    return Versus(ref_m, pol_m, ref_rec, pol_rec, paired_outcomes(pol_rec, ref_rec,
                                                                  task.top_score), kl)


def heldout_signals(policy: Model, params, ref: Model, ref_params, task: Task,
                    shapes: TaskConfig, key: jax.Array) -> dict[str, float]:
    """The current policy on the held-out prompts under the pinned protocol (use the final
    evaluation's key so intermediate and final numbers are comparable; nothing is written):
    ``heldout/<k>`` for the task's headline metrics and ``heldout/kl``, the mean exact
    per-sequence KL(π ‖ π_ref) of its responses (on one device, like
    :func:`versus_reference`)."""
    params, ref_params = single_device((params, ref_params))
    metrics, records = _heldout(policy, params, task, shapes, key)
    kl = sequence_kl(policy, params, ref, ref_params, task, shapes, records)
    return {**{f"heldout/{k}": metrics[k] for k in task.headline},
            "heldout/kl": float(kl.mean())}


def score_groups(score: ScoreFn, params, arrays: dict[str, np.ndarray], *, batch: int = 512
                 ) -> np.ndarray:
    """``score`` of every response of :func:`encode_groups` arrays, ``[N, K]`` (fixed-size
    batches of ``[prompt | response]`` rows)."""
    n, k, lr = arrays["responses"].shape
    tokens = np.concatenate([np.repeat(arrays["prompts"], k, axis=0),
                             arrays["responses"].reshape(n * k, lr)], axis=1)
    mask = np.concatenate([np.repeat(arrays["prompt_mask"], k, axis=0),
                           arrays["response_mask"].reshape(n * k, lr)], axis=1)
    out = []
    for s in range(0, n * k, batch):
        sl = slice(s, s + batch)
        rows = len(tokens[sl])
        out.append(np.asarray(score(params, jnp.asarray(pad_rows(tokens[sl], batch)),
                                    jnp.asarray(pad_rows(mask[sl], batch))))[:rows])
    return np.concatenate(out).reshape(n, k)


def best_of_n(policy: Model, params, score: ScoreFn, rm_params, task: Task, shapes: TaskConfig,
              key: jax.Array, *, n: int) -> tuple[dict[str, float], list[dict]]:
    """Best-of-N under the pinned protocol: for each held-out prompt and sample index, N fresh
    samples reranked by ``score``; the top one is judged. Its KL to the sampling policy is at
    most log N − (N − 1)/N (analytic; equal only when the N samples are all distinct, less for a
    policy whose answers repeat: ``rlhf_jax.best_of_n``)."""
    prompts = task.prompts("heldout")
    per = shapes.eval_samples * n
    _, texts, ids = generate_ids(policy, params, task, prompts, key, n_samples=per,
                                 sampling=SamplingConfig(max_new_tokens=shapes.max_new_tokens),
                                 prompt_len=shapes.prompt_len)
    rows = [texts[i * per:(i + 1) * per] for i in range(len(prompts))]
    row_ids = [ids[i * per:(i + 1) * per] for i in range(len(prompts))]
    arrays = encode_groups(task.tokenizer, prompts, rows, prompt_len=shapes.prompt_len,
                           response_len=shapes.max_new_tokens + 1, ids=row_ids)
    best = score_groups(score, rm_params, arrays).reshape(
        len(prompts), shapes.eval_samples, n).argmax(-1)
    chosen_p = [p for p in prompts for _ in range(shapes.eval_samples)]
    picks = [(i, j * n + best[i, j]) for i in range(len(prompts))
             for j in range(shapes.eval_samples)]
    chosen_t = [rows[i][c] for i, c in picks]
    judgements = judge_all(task, chosen_p, chosen_t)
    return (task.summarize(chosen_p, judgements),
            _records(chosen_p, chosen_t, judgements, shapes.eval_samples,
                     [row_ids[i][c] for i, c in picks]))


def pairwise_gold_agreement(rewards: np.ndarray, gold: np.ndarray) -> float:
    """Share of within-prompt pairs with different gold scores that ``rewards [N, K]`` order as
    ``gold [N, K]`` does (NaN if there are none)."""
    i, j = np.triu_indices(rewards.shape[1], 1)
    dg = gold[:, i] - gold[:, j]
    agree = np.sign(rewards[:, i] - rewards[:, j]) == np.sign(dg)
    return float(agree[dg != 0].mean()) if (dg != 0).any() else float("nan")


def rm_gold_agreement(score: ScoreFn, rm_params, task: Task, shapes: TaskConfig,
                      records: list[dict]) -> float:
    """RM vs gold ordering over pairs of one held-out prompt's sampled responses (``records`` of
    :func:`evaluate_heldout`) with different gold scores (a record stored before its sampled ids:
    its text's canonical encoding, cut to the budget)."""
    by_uid: dict[str, list[dict]] = {}
    for r in records:
        by_uid.setdefault(r["uid"], []).append(r)
    prompts_by_uid = {p.uid: p for p in task.prompts("heldout")}
    uids = list(by_uid)
    arrays = encode_groups(task.tokenizer, [prompts_by_uid[u] for u in uids],
                           [[r["response"] for r in by_uid[u]] for u in uids],
                           prompt_len=shapes.prompt_len, response_len=shapes.max_new_tokens + 1,
                           cut=True, ids=[stored_ids(by_uid[u]) for u in uids])
    gold = np.asarray([[r["score"] for r in by_uid[u]] for u in uids], np.float32)
    return pairwise_gold_agreement(score_groups(score, rm_params, arrays), gold)
