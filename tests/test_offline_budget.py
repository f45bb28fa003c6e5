"""The task's comparisons as DPO trains on them: a response the sampler cut at the budget counts
only the tokens it drew (no appended EOS), one that ended with EOS keeps it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.batching import encode_prompts
from rlhf_jax.data.tokenizers import response_ids, stop_ids
from rlhf_jax.labeler import Preferences
from rlhf_jax.models import create_model
from rlhf_jax.models.config import preset
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.stages.offline import offline_arrays, response_logps
from rlhf_jax.tasks import TaskConfig, build_task


def test_log_probs_are_those_of_the_sampled_tokens_at_and_below_the_budget():
    tc = TaskConfig()
    task = build_task(tc)
    tok = task.tokenizer
    cfg = preset("test")
    cfg = dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, tok.vocab_size),
                              max_len=max(cfg.max_len, tc.prompt_len + tc.max_new_tokens + 1))
    model, params = create_model(cfg, jax.random.key(0))
    prompts = task.prompts("train")[:2]
    flat = [p for p in prompts for _ in range(2)]
    ids, mask = encode_prompts(tok, flat, tc.prompt_len)
    out = sample(model, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(1),
                 cfg=SamplingConfig(max_new_tokens=tc.max_new_tokens), eos_id=stop_ids(tok),
                 pad_id=tok.pad_id)
    rows = [response_ids(tok, r) for r in np.asarray(out.tokens).tolist()]
    drawn = np.asarray(out.mask).sum(-1)
    assert (drawn == tc.max_new_tokens).any()          # an untrained model runs to the budget
    # one more response that stops early: its EOS is a token the policy wrote, and counts
    short = rows[0][:3]
    prefs = Preferences(list(prompts),
                        [[tok.decode(rows[0]), tok.decode(rows[1])],
                         [tok.decode(rows[2]), tok.decode(short)]],
                        np.array([[1.0, 0.0], [1.0, 0.0]], np.float32),
                        np.zeros((2, 2), np.float32), [["x", "x"], ["x", "x"]],
                        [[rows[0], rows[1]], [rows[2], short]])
    data = offline_arrays(tok, prefs, tc, max_len=cfg.max_len)
    want_len = np.array([[drawn[0], drawn[1]], [drawn[2], len(short) + 1]], np.float32)
    np.testing.assert_array_equal(data["lengths"], want_len)
    np.testing.assert_array_equal(data["response_mask"].sum(-1), want_len)
    got = np.asarray(response_logps(model, params, *(jnp.asarray(data[f]) for f in (
        "prompts", "prompt_mask", "responses", "response_mask"))))
    sampled = np.asarray(out.logprobs).sum(-1)
    np.testing.assert_allclose(got[0], sampled[:2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1, 0], sampled[2], rtol=1e-4, atol=1e-4)
