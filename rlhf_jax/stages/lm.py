"""Stage 0 and 1 pieces: pretraining on the task's corpus, then supervised fine-tuning (SFT).

Pretraining gives the base model its knowledge (the corpus of facts); SFT teaches the
question/answer format from the demonstrator — fabrications included, at the demonstrator's rate.
This module holds the two configs, the base model (random or imported), the resumable LM training
and the knowledge probes; ``experiments/pretrain.py`` and ``experiments/sft.py`` compose them.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from rlhf_jax.configs import check, check_numbers, positive
from rlhf_jax.data.batching import EpochOrder, check_tokens
from rlhf_jax.data.task import Task
from rlhf_jax.evaluate import probe_accuracy
from rlhf_jax.losses.lm import lm_loss_fn, lm_with_replay_loss_fn
from rlhf_jax.models import PRESETS, GPTConfig, create_model
from rlhf_jax.models.hf import file_digests, load_pretrained
from rlhf_jax.runs import RunDir, config_differences
from rlhf_jax.stages.common import (STREAM_INIT, check_context, check_prompts_fit,
                                    epoch_order, stage_key, train_stage)
from rlhf_jax.stages.file_checks import (check_causal_lm, check_export_dir,
                                         check_file_inputs, check_no_file_fields)
from rlhf_jax.tasks import TaskConfig
from rlhf_jax.train import OptimConfig


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Pretraining the base model on the task's corpus.

    Attributes:
      seed: seeds initialisation, batch order and evaluation sampling.
      task: the task (``--task.name``, default the embedded facts world), its settings, and the
        shapes and evaluation samples it runs at.
      model: architecture; ``vocab_size`` is replaced by the tokenizer's. Unused with
        ``init_from``.
      init_from: a Hugging Face checkpoint directory (config.json + safetensors [+
        tokenizer.json]) to start from instead of a random initialisation: its architecture
        replaces ``model`` and its tokenizer (when it has one) the task's; ``steps`` then continue
        pretraining on the task's corpus (0 = use the checkpoint as the base model as it is).
        Every experiment script sets it with ``--init-from DIR``.
      seq_len: tokens per packed training row.
      batch_size: rows per step.
      steps: optimizer steps (may be 0 with ``init_from``).
      optim: AdamW / schedule / clipping.
      log_every: log metrics every this many steps.
      checkpoint_every: save a resumable checkpoint every this many steps (0 = only at the end).
      fsdp: split parameters and optimizer state over the devices (FSDP) instead of replicating.
    """

    seed: int = 0
    task: TaskConfig = TaskConfig()
    model: GPTConfig = PRESETS["task"]
    init_from: str = ""
    seq_len: int = 64
    batch_size: int = 32
    steps: int = 600
    optim: OptimConfig = OptimConfig(learning_rate=5e-3, warmup_steps=30, weight_decay=0.0)
    log_every: int = 50
    checkpoint_every: int = 200
    fsdp: bool = False

    def __post_init__(self):
        check_numbers(self)
        positive(self, "seq_len", "batch_size", "log_every")
        check(self.steps > 0 or (self.init_from and self.steps == 0), "steps",
              f"must be > 0 (or 0 with init_from), got {self.steps}")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        check(self.steps == 0 or self.optim.warmup_steps <= self.steps, "optim.warmup_steps",
              f"{self.optim.warmup_steps} exceeds steps={self.steps}")
        check(not self.init_from or Path(self.init_from).is_dir(), "init_from",
              f"{self.init_from} is not a directory")
        if not self.init_from:   # an imported architecture is checked when it is read
            check_seq_len(self, self.model)
            check_context(self.model, self.task)


def check_seq_len(cfg: PretrainConfig, model) -> None:
    check(cfg.seq_len <= model.max_len, "seq_len",
          f"{cfg.seq_len} exceeds the model context model.max_len={model.max_len}")


SFTData = Literal["task", "hh-rlhf", "summarize"]
SFT_DATA = get_args(SFTData)
# what SFT on preference files reads (besides --optim.*); any other change is refused
SFT_FILE_FIELDS = ("seed", "batch_size", "steps", "log_every", "checkpoint_every", "fsdp",
                   "data", "data_dir", "max_prompt_tokens", "max_response_tokens", "export_hf",
                   "pretrain.init_from")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on the demonstrator's answers (loss on response tokens only).

    Attributes:
      seed: seeds the demonstrations, batch order and evaluation sampling.
      pretrain_dir: a finished pretraining run to start from; empty = run ``pretrain`` first
        into ``<out>/pretrain`` (reused if already finished there).
      pretrain: the pretraining config used when ``pretrain_dir`` is empty.
      demos_per_prompt: independent demonstrations per training prompt.
      ptx_coef: weight of the pretraining-replay loss added to the SFT loss (0 = pure SFT).
      ptx_batch_size: corpus rows replayed per step when ``ptx_coef > 0``.
      batch_size: SFT rows per step.
      steps: optimizer steps; 0 = no fine-tuning, the pretrained model is the starting policy
        (as in Ziegler et al.; required by a task without demonstrations, ``Task.demonstrations``).
      optim: AdamW / schedule / clipping.
      log_every: log metrics every this many steps.
      checkpoint_every: resumable checkpoint interval (0 = only at the end).
      fsdp: split parameters and optimizer state over the devices (FSDP) instead of replicating.
      data: ``task`` (the task's demonstrations), or human preference files, ``hh-rlhf`` or
        ``summarize``: fine-tune the ``--init-from`` checkpoint on each pair's preferred response
        (``experiments/sft.py``'s ``run_files``; no task, no pretraining, no replay).
      data_dir: with file data, the directory holding ``train.jsonl`` and ``test.jsonl`` (or
        ``.jsonl.gz``), as the reward model reads them.
      max_prompt_tokens: with file data, the prompt budget in tokens (BOS included); a longer
        prompt keeps its last tokens.
      max_response_tokens: with file data, the response budget in tokens (EOS included when it
        fits); a longer response keeps its first tokens and no EOS.
      export_hf: with file data, also write the fine-tuned policy to this directory as a Hugging
        Face causal LM (with the checkpoint's tokenizer files): the ``--init-from`` of a reward
        model or DPO run on the same files.
    """

    seed: int = 0
    pretrain_dir: str = ""
    pretrain: PretrainConfig = PretrainConfig()
    demos_per_prompt: int = 4
    ptx_coef: float = 1.0
    ptx_batch_size: int = 16
    batch_size: int = 64
    steps: int = 500
    optim: OptimConfig = OptimConfig(learning_rate=2e-3, warmup_steps=20, weight_decay=0.0)
    log_every: int = 50
    checkpoint_every: int = 0
    fsdp: bool = False
    data: SFTData = "task"
    data_dir: str = ""
    max_prompt_tokens: int = 256
    max_response_tokens: int = 128
    export_hf: str = ""

    def __post_init__(self):
        check_numbers(self)
        positive(self, "demos_per_prompt", "batch_size", "log_every", "ptx_batch_size")
        check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        check(self.ptx_coef >= 0, "ptx_coef", f"must be >= 0, got {self.ptx_coef}")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        check(self.steps == 0 or self.optim.warmup_steps <= self.steps, "optim.warmup_steps",
              f"{self.optim.warmup_steps} exceeds steps={self.steps}")
        for name in ("max_prompt_tokens", "max_response_tokens"):   # room for BOS / EOS + a token
            check(getattr(self, name) >= 2, name, f"must be >= 2, got {getattr(self, name)}")
        check(self.data in SFT_DATA, "data", f"must be one of {SFT_DATA}, got {self.data!r}")
        if self.data == "task":
            check_no_file_fields(self)
        else:
            self._check_file_data()

    def _check_file_data(self) -> None:
        """On preference files the checkpoint is fine-tuned directly: the task's options
        (pretraining, demonstrations, replay) do nothing and are refused when set."""
        init_from = self.pretrain.init_from
        check_file_inputs(self, init_from, "pretrain.init_from",
                          "fine-tunes an imported checkpoint on the preferred responses")
        check_causal_lm(init_from, "pretrain.init_from", f"--data {self.data} fine-tunes")
        check(self.steps > 0, "steps", "must be > 0 on preference files (the checkpoint itself "
              "needs no SFT run)")
        changed = [k for k in config_differences(dataclasses.asdict(SFTConfig()), self)
                   if k not in SFT_FILE_FIELDS and not k.startswith("optim.")
                   and not (k == "ptx_coef" and self.ptx_coef == 0)]   # no replay: as it runs
        check(not changed, changed[0] if changed else "data",
              f"unused with --data {self.data}: the checkpoint is fine-tuned on the files alone "
              "(no task pretraining, demonstrations or replay)")
        if self.export_hf:
            check_export_dir(self.export_hf, init_from)


def train_lm(model, params, data: dict[str, np.ndarray], *, seed: int, batch_size: int,
              steps: int, optim: OptimConfig, run: RunDir, prefix: str, log_every: int,
              checkpoint_every: int, replay: dict[str, np.ndarray] | None = None,
              ptx_coef: float = 0.0, ptx_batch_size: int = 0, fsdp: bool = False):
    """Next-token loss over ``data`` rows (plus ``ptx_coef`` × the loss on replayed ``replay``
    rows), resumable."""
    check_tokens(data, vocab_size=model.cfg.vocab_size, source=f"{prefix} data")
    if replay is not None:
        check_tokens(replay, vocab_size=model.cfg.vocab_size, source=f"{prefix} replay data")
    order = epoch_order(len(data["tokens"]), batch_size, seed, "batch_size", "rows")
    if replay is not None and ptx_coef > 0:
        replay_order = EpochOrder(len(replay["tokens"]), ptx_batch_size, seed + 1)
        loss_fn = functools.partial(lm_with_replay_loss_fn, model=model, ptx_coef=ptx_coef)
        batch_at = lambda s: {"sft": order.batch(data, s),  # noqa: E731
                              "ptx": replay_order.batch(replay, s)}
    else:
        loss_fn = functools.partial(lm_loss_fn, model=model)
        batch_at = lambda s: order.batch(data, s)  # noqa: E731
    return train_stage(params, loss_fn, batch_at, seed=seed, steps=steps, optim=optim, run=run,
                       prefix=prefix, log_every=log_every, checkpoint_every=checkpoint_every,
                       fsdp=fsdp)


def knowledge(model, params, task: Task, prompt_len: int, name: str) -> dict[str, float]:
    """``knowledge/<name>``: the share of the task's held-out knowledge probes the model gets
    right (none for a task without probes)."""
    probes = task.knowledge_probes("heldout")
    if not probes:
        return {}
    return {f"knowledge/{name}": probe_accuracy(model, params, task.tokenizer, probes,
                                                length=prompt_len)}


def base_model(cfg: PretrainConfig, task: Task):
    """``(cfg, Model, params, meta)`` of the model pretraining starts from: ``cfg.init_from``'s
    checkpoint (``meta`` records its path, architecture, dtype and file digests), or a random
    initialisation of ``cfg.model`` at the task tokenizer's vocabulary (``cfg`` records it)."""
    check_prompts_fit(task, cfg.task)
    if cfg.init_from:
        model, params = import_base_model(cfg, task)
        meta = {"init_from": {"path": str(Path(cfg.init_from).resolve()),
                              "architecture": model.source.architecture,
                              "dtype": model.source.dtype,
                              "files": file_digests(cfg.init_from)}}
        return cfg, model, params, meta
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(vocab_size=task.tokenizer.vocab_size))
    model, params = create_model(cfg.model, stage_key(cfg.seed, STREAM_INIT))
    return cfg, model, params, None


def import_base_model(cfg: PretrainConfig, task):
    """``(Model, params)`` of the causal LM in ``cfg.init_from``, checked against the task."""
    model, params = load_pretrained(cfg.init_from)
    check(not model.heads, "init_from", f"{cfg.init_from} holds a {model.source.architecture}; "
          "the base model must be a causal language model")
    check(task.tokenizer.vocab_size <= model.cfg.vocab_size, "init_from",
          f"the task's tokenizer has {task.tokenizer.vocab_size} ids but {cfg.init_from} embeds "
          f"{model.cfg.vocab_size} (give the checkpoint a tokenizer.json)")
    check_seq_len(cfg, model.cfg)
    check_context(model.cfg, cfg.task, "init_from")
    return model, params
