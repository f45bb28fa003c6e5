"""Checks of a stage's input files and Hugging Face export, before any work: preference files
from an imported checkpoint (the reward model, DPO and SFT on HH-RLHF or summarize-from-feedback),
and the directory an export writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlhf_jax import progress
from rlhf_jax.configs import check
from rlhf_jax.data.preferences import split_files
from rlhf_jax.models.hf import load_config
from rlhf_jax.runs import read_config_json

EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json",   # what export_hf holds
                "tokenizer_config.json")
# and what an export killed mid-write leaves (models.hf_io writes `.<name>.tmp`, then renames)
EXPORT_PARTIAL = tuple(f".{name}.tmp" for name in EXPORT_FILES)


FILE_ONLY = ("data_dir", "export_hf", "max_prompt_tokens", "max_response_tokens")
# above this, a stage's default learning rate is one for the task's small models from scratch
FINE_TUNE_LR = 1e-4


def check_no_file_fields(cfg) -> None:
    """On the task's own data a stage's file options (:data:`FILE_ONLY`) do nothing (the task's
    ``prompt_len`` / ``max_new_tokens`` apply): one set is refused, naming it, not dropped."""
    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    unused = [k for k in FILE_ONLY if getattr(cfg, k) != default[k]]
    check(not unused, unused[0] if unused else "data",
          "only used with file data (--data hh-rlhf or summarize)")


def check_file_inputs(cfg, init_from: str, init_field: str, what: str) -> None:
    """Preference files read from an imported checkpoint (``cfg.data``, ``cfg.data_dir``,
    ``cfg.max_prompt_tokens``, ``cfg.max_response_tokens``; ``init_from`` is the checkpoint, named
    ``init_field`` in errors, and ``what`` says what the stage does with them): the checkpoint
    holds a tokenizer, both split files exist, and the budgets fit its context."""
    use = f"--data {cfg.data} {what}"
    check(bool(init_from), init_field, f"{use}: give --init-from CKPT")
    check((Path(init_from) / "tokenizer.json").is_file(), init_field,
          f"{use}, tokenized with its tokenizer: {init_from} has no tokenizer.json")
    check(bool(cfg.data_dir), "data_dir", f"--data {cfg.data} reads DIR/train.jsonl(.gz) "
          "and DIR/test.jsonl(.gz): give --data-dir DIR")
    try:
        split_files(cfg.data_dir)
    except FileNotFoundError as e:
        check(False, "data_dir", str(e))
    max_len = load_config(init_from)[0].max_len
    check(cfg.max_prompt_tokens + cfg.max_response_tokens <= max_len, "max_response_tokens",
          f"max_prompt_tokens {cfg.max_prompt_tokens} + max_response_tokens "
          f"{cfg.max_response_tokens} exceeds the checkpoint's context {max_len}")


def warn_task_learning_rate(cfg) -> bool:
    """A stage on preference files fine-tunes a pretrained checkpoint, but its config's defaults
    are the embedded task's (SFT 2e-3, the RM 5e-4: small models trained from scratch): left at a
    default above :data:`FINE_TUNE_LR` the learning rate is warned about, not changed (a run's
    config is what it ran with). Returns whether it warned."""
    default = next(f.default for f in dataclasses.fields(cfg) if f.name == "optim")
    lr = cfg.optim.learning_rate
    if lr != default.learning_rate or lr <= FINE_TUNE_LR:
        return False
    progress.message(f"warning: optim.learning_rate {lr:g} is this stage's default for the "
                     "embedded task's small models trained from scratch; fine-tuning a "
                     "pretrained checkpoint usually takes 1e-6 to 1e-4: set "
                     "--optim.learning-rate")
    return True


def check_causal_lm(init_from: str, field: str, what: str) -> None:
    """A policy trained on preference files (SFT, DPO) starts from a causal language model: a
    checkpoint with a scalar head (a sequence classifier, such as a reward model's export) would
    have its trunk trained as a policy (its embedding read as the LM head) and be exported as a
    classifier again. ``what`` says what the stage does (``--data hh-rlhf fine-tunes``)."""
    _, arch, heads = load_config(init_from)
    check(not heads, field, f"{what} a causal language model: {init_from} holds a {arch} (a "
          "reward model's export?); give the policy's checkpoint")


def check_export_dir(export_hf: str, init_from: str, field: str = "export_hf") -> None:
    """An export overwrites nothing but an earlier export: ``export_hf`` is not the checkpoint
    and is new, empty or holds only an export's files (whose run :func:`check_export_run_dir`
    checks)."""
    export = Path(export_hf)
    check(export.resolve() != Path(init_from).resolve(), field,
          f"{export} is the --init-from checkpoint: the export would overwrite it")
    check(export.is_dir() or not export.exists(), field, f"{export} is not a directory")
    if export.is_dir():
        other = sorted(f.name for f in export.iterdir()
                       if f.name not in EXPORT_FILES + EXPORT_PARTIAL)
        check(not other, field, f"{export} holds {', '.join(other[:3])}: not an export's "
              "files; give a new or empty directory")


def check_export_run_dir(export_hf: str, out: str | Path, field: str = "export_hf") -> None:
    """``export_hf`` (if set) is not the run directory ``out``, inside it or around it, and an
    export already there is this run's own (``out/config.json`` names that directory: a rerun
    exports again)."""
    if not export_hf:
        return
    export, run = Path(export_hf).resolve(), Path(out).resolve()
    check(export != run and run not in export.parents and export not in run.parents, field,
          f"{export_hf} is the run directory {out}, inside it or around it: the export's "
          "files would overwrite or mix with the run's (its config.json); give a directory "
          "outside it")
    if export.is_dir() and any(export.iterdir()):
        cfg_file = run / "config.json"
        earlier = cfg_file.is_file() and read_config_json(cfg_file).get(field)
        check(bool(earlier) and Path(earlier).resolve() == export, field,
              f"{export_hf} holds an export, not of the run in {out}: give a new or "
              "empty directory")
