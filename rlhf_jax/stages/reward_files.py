"""The reward model on human preference files: Anthropic HH-RLHF or OpenAI summarize-from-feedback
pairs, from an imported Hugging Face checkpoint (as TRL's ``RewardTrainer`` on HH).

``DATA_DIR/train.jsonl(.gz)`` and ``DATA_DIR/test.jsonl(.gz)`` are parsed by
:mod:`rlhf_jax.data.preference_formats` into a versioned TFDS data set in ``<out>/data`` (builders
``HhRlhf`` / ``SummarizeFromFeedback``; a malformed row stops the run with an error naming file,
line and field), read back, and tokenized with the checkpoint's ``tokenizer.json``: the prompt is
``[BOS] + prompt`` (no BOS when the tokenizer adds none: GPT-2, Qwen) keeping its last
``max_prompt_tokens`` tokens, each response its first
``max_response_tokens - 1`` tokens and then EOS (the reward is read there). The RM is the
checkpoint's trunk with a scalar head, trained with the K = 2 Bradley–Terry loss (the stage's
``kwise_rm_loss_fn``) through ``train_stage``; the summary holds the test split's pairwise accuracy
and mean margin, and the truncation counts.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from rlhf_jax import progress
from rlhf_jax.data.batching import check_tokens, pad_left, pad_right
from rlhf_jax.data.preference_records import decode_record, sha256_file
from rlhf_jax.data.preferences import (HhRlhf, SummarizeFromFeedback, load_preference_source,
                                       split_files)
from rlhf_jax.data.tokenizers import HFTokenizer, Tokenizer, TokenizerError, with_bos
from rlhf_jax.models import GPTConfig
from rlhf_jax.models.hf import (CheckpointError, file_digests, load_pretrained,
                                save_pretrained)
from rlhf_jax.runs import RunDir
from rlhf_jax.stages.file_checks import warn_task_learning_rate

BUILDERS = {"hh-rlhf": HhRlhf, "summarize": SummarizeFromFeedback}
SPLITS = ("train", "test")


def build_file_dataset(data: str, data_dir: str | Path, out_dir: Path) -> dict[str, dict]:
    """Parse the split files into the versioned TFDS data set under ``out_dir`` (reused when built
    from the same files); ``{split: the builder's metadata}`` (counts, HH turn truncations)."""
    builder = BUILDERS[data](split_paths=split_files(data_dir, SPLITS), data_dir=out_dir)
    builder.download_and_prepare()
    return {"name": builder.name, **builder.info.metadata["splits"]}


def input_digests(ckpt: str, data_dir: str) -> dict:
    """``meta.json``'s record of a file-data run's inputs: the checkpoint's and the split files'
    sha256 (a rerun on other files is refused: ``RunDir.write_meta``)."""
    return {"init_from": {"path": str(Path(ckpt).resolve()), "files": file_digests(ckpt)},
            "data": {"path": str(Path(data_dir).resolve()), "files": {
                Path(f).name: sha256_file(f) for f in split_files(data_dir, SPLITS).values()}}}


def file_pairs(data: str, data_dir: str, ckpt: str, out: Path, *, prompt_tokens: int,
               response_tokens: int, source: str, eos_when_cut: bool = True):
    """The checkpoint ``ckpt`` (tokenizer, model, parameters) and the ``train`` / ``test`` token
    pairs of the preference files (:func:`encode_pairs` of the TFDS data set built in
    ``out/data``), with the summary's ``data/*`` counts: ``(tok, model, params, arrays,
    summary)``. The checkpoint is read first: one refused here leaves no data set behind, so
    the rerun with it fixed starts afresh (``RunDir.started``)."""
    tok = HFTokenizer.from_pretrained(ckpt)
    model, params = load_pretrained(ckpt)
    if tok.vocab_size > model.cfg.vocab_size:   # before the data set: a rerun starts afresh
        raise CheckpointError(f"{Path(ckpt) / 'tokenizer.json'}: its {tok.vocab_size} ids "
                              f"exceed the {model.cfg.vocab_size} the model embeds (config.json"
                              " vocab_size): not this model's tokenizer")
    fresh = not (out / "data").exists()
    built = build_file_dataset(data, data_dir, out / "data")
    arrays, summary = {}, {}
    for split in SPLITS:
        try:
            arrays[split], counts = encode_pairs(
                tok, read_records(out / "data", built["name"], split),
                prompt_tokens=prompt_tokens, response_tokens=response_tokens,
                eos_when_cut=eos_when_cut)
        except TokenizerError:   # not this data's tokenizer: the data set just built (derived
            if fresh:            # from the files) goes, so the rerun with another starts afresh
                shutil.rmtree(out / "data", ignore_errors=True)
            raise
        check_tokens(arrays[split], vocab_size=model.cfg.vocab_size,
                     source=f"{source}: {split} pairs")
        meta = built[split]
        summary.update({f"data/{split}_pairs": len(arrays[split]["prompts"]),
                        f"data/{split}_prompt_turns_truncated": meta.get("prompts_truncated", 0),
                        **{f"data/{split}_{k}": meta.get(k, 0) for k in (
                            "malformed_rows_left_out", "identical_pairs_skipped",
                            "empty_responses", "multi_turn_responses")},
                        **{f"data/{split}_{k}": v for k, v in counts.items()}})
    summary["data/test_pairs_in_train"] = shared_pairs(arrays["train"], arrays["test"])
    if summary["data/test_pairs_in_train"]:
        progress.message(f"warning: {summary['data/test_pairs_in_train']} of the "
                         f"{summary['data/test_pairs']} test pairs are also training pairs "
                         "(token for token): the test scores (accuracy, margin, NLL) overstate "
                         "generalisation")
    return tok, model, params, arrays, summary


def start_file_run(config, rc, out: Path, *, source: str, eos_when_cut: bool = True,
                   ckpt: str | None = None):
    """A stage on preference files: its run directory (``config`` and the inputs' digests
    written; ``rc`` the config naming the files and the budgets, and the checkpoint, unless
    ``ckpt`` does: the reward config's ``sft.pretrain.init_from``), then :func:`file_pairs`.
    Returns ``(run, tok, model, params, arrays, summary)``."""
    ckpt = rc.sft.pretrain.init_from if ckpt is None else ckpt
    warn_task_learning_rate(config)
    run = RunDir(out)
    run.write_config(config)
    run.write_meta(seed=config.seed, extra=input_digests(ckpt, rc.data_dir))
    return (run, *file_pairs(rc.data, rc.data_dir, ckpt, out, prompt_tokens=rc.max_prompt_tokens,
                             response_tokens=rc.max_response_tokens, source=source,
                             eos_when_cut=eos_when_cut))


def read_records(out_dir: Path, name: str, split: str) -> list[dict]:
    """The stored records of one split, decoded (``str`` texts)."""
    return [decode_record(r) for r in load_preference_source(out_dir, name, split)]


def encode_pairs(tok: Tokenizer, records: Sequence[dict], *, prompt_tokens: int,
                 response_tokens: int, eos_when_cut: bool = True
                 ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Token arrays of K-wise records (``preference_arrays`` layout): ``prompts [N, Lp]`` left-
    padded, ``responses [N, K, Lr]`` right-padded, ``ranking [N, K]``; and the truncation counts.

    A prompt is ``with_bos(encode(prompt))`` (a BOS first when the tokenizer adds one), cut to
    its last ``prompt_tokens`` tokens (the BOS is dropped with the oldest text); a response is
    ``encode(response)`` cut to its first ``response_tokens - 1`` tokens, then ``[eos]``, so the
    RM always reads its score at an EOS. With ``eos_when_cut=False`` (a policy trained on the
    pairs, as TRL's DPO tokenizes them) a response is ``encode(response) + [eos]`` cut to its
    first ``response_tokens`` tokens: a cut response has no EOS, so the policy is not taught to
    stop where the budget did.
    """
    prompts, responses = [], []
    counts = {"prompts_truncated": 0, "responses_truncated": 0}
    for r in records:
        ids = with_bos(tok, _encode(tok, r["prompt"], r.get("id")))
        counts["prompts_truncated"] += len(ids) > prompt_tokens
        prompts.append(ids[-prompt_tokens:])
        for text in r["responses"]:
            ids = _encode(tok, text, r.get("id"))
            counts["responses_truncated"] += len(ids) > response_tokens - 1
            responses.append(ids[:response_tokens - 1] + [tok.eos_id] if eos_when_cut
                             else (ids + [tok.eos_id])[:response_tokens])
    n, k = len(records), len(records[0]["responses"]) if records else 0
    p_ids, p_mask = pad_left(prompts, prompt_tokens, tok.pad_id, what="prompt")
    r_ids, r_mask = pad_right(responses, response_tokens, tok.pad_id, what="response")
    arrays = {"prompts": p_ids, "prompt_mask": p_mask,
              "responses": r_ids.reshape(n, k, -1), "response_mask": r_mask.reshape(n, k, -1),
              "ranking": np.asarray([r["ranking"] for r in records], np.float32).reshape(n, k)}
    # responses that differ only past the token budget: no gradient, a tie in the accuracy
    counts["pairs_identical_after_truncation"] = int(
        (arrays["responses"] == arrays["responses"][:, :1]).all(axis=(1, 2)).sum()) if k else 0
    return arrays, counts


def _encode(tok: Tokenizer, text: str, record_id: str | None) -> list[int]:
    """``tok.encode(text)``; a text the tokenizer cannot encode is an error naming the record
    (its id is the preference file and line: ``helpful-base/train:17``)."""
    try:
        return tok.encode(text)
    except TokenizerError as e:
        raise TokenizerError(f"{e}, in record {record_id!r} (file and line): not this data's "
                             "tokenizer?") from None


def preferred_responses(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each pair's preferred response (the higher ``ranking``; the first on a tie) in the K = 1
    layout of :func:`encode_pairs`: ``prompts``, ``prompt_mask``, ``responses [N, 1, Lr]``,
    ``response_mask``."""
    rows = np.arange(len(arrays["prompts"]))
    best = np.argmax(arrays["ranking"], axis=1)
    return {"prompts": arrays["prompts"], "prompt_mask": arrays["prompt_mask"],
            "responses": arrays["responses"][rows, best][:, None],
            "response_mask": arrays["response_mask"][rows, best][:, None]}


def shared_pairs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> int:
    """How many pairs of ``b`` are also pairs of ``a``, token for token (prompt and both
    responses as encoded): a test split that repeats training comparisons."""
    def rows(x):
        return {p.tobytes() + r.tobytes() for p, r in zip(x["prompts"], x["responses"])}
    seen = rows(a)
    return sum(p.tobytes() + r.tobytes() in seen for p, r in zip(b["prompts"], b["responses"]))


def pairwise_metrics(rewards: np.ndarray, ranking: np.ndarray) -> dict[str, float]:
    """Pairwise accuracy and mean margin of K = 2 rewards ``[N, 2]`` against ``ranking [N, 2]``:
    ``d = sign(rank_0 − rank_1) · (r_0 − r_1)`` (the preferred minus the other, over untied
    pairs); accuracy = share of d > 0 (d = 0 counts as half), margin = mean d."""
    sign = np.sign(ranking[:, 0] - ranking[:, 1])
    d = (sign * (rewards[:, 0] - rewards[:, 1]))[sign != 0]
    return {"accuracy": float(np.mean((d > 0) + 0.5 * (d == 0))), "margin": float(np.mean(d)),
            "pairs": int(d.size)}


def pad_is_eos(tok) -> bool:
    """Whether ``tok`` pads with an EOS id (GPT-2's convention): transformers then reads an
    exported sequence classifier one token before a trailing EOS, not where rlhf_jax reads it."""
    return tok.pad_id in (tuple(getattr(tok, "eos_ids", ())) or (tok.eos_id,))


def export_reward_model(path: str | Path, rm, params, norm: tuple[float, float], tok) -> float:
    """Write the RM as an HF sequence classifier scoring ``gain · r + bias`` (``norm``), with
    ``rm.source``'s config fields and ``tok``'s ``tokenizer.json``; returns the constant left out.

    GPT-2 holds the constant (folded into ``ln_f.bias``; 0 is returned). The Llama family cannot
    (RMSNorm has no bias): it exports ``gain · (r − head bias)``, preferences unchanged, and the
    returned constant ``gain · head bias + bias`` is what its scores lack."""
    gain, bias = norm
    if pad_is_eos(tok):
        print(f"warning: {path}: the tokenizer pads with its EOS id {tok.pad_id}, so transformers "
              "will read this reward model's score one token before a trailing EOS (at the last "
              "token that is not pad_token_id), where rlhf_jax read it; give the checkpoint a pad "
              "token of its own to score alike (summary: export/pad_is_eos)", file=sys.stderr,
              flush=True)
    shift = bias
    if not isinstance(rm.cfg, GPTConfig):
        shift = -gain * float(np.asarray(params["heads"]["reward"]["bias"][...])[0])
    save_pretrained(path, rm, params, reward_norm=(gain, shift), tokenizer=tok)
    return bias - shift
