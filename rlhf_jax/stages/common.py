"""Pieces every stage shares: keys, upstream runs, model loading and training."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from rlhf_jax import progress, scripts
from rlhf_jax.checkpoint import Checkpointer, load_params, save_params
from rlhf_jax.configs import check, from_dict
from rlhf_jax.data.batching import EpochOrder
from rlhf_jax.data.task import Task
from rlhf_jax.data.tokenizers import HFTokenizer, with_bos
from rlhf_jax.loop import fit, resume
from rlhf_jax.models import ModelConfig, create_model
from rlhf_jax.models.hf import load_config
from rlhf_jax.parallel import (AXIS, data_parallel, fsdp_specs, make_fsdp_train_step, make_mesh,
                               place, shard_batch, state_specs, unshard)
from rlhf_jax.runs import RunDir, config_differences, read_config_json
from rlhf_jax.tasks import TaskConfig, build_task
from rlhf_jax.train import OptimConfig, TrainState, make_optimizer, make_train_step

# independent key streams derived from the seed (fold_in(key(seed), stream))
STREAM_INIT, STREAM_TRAIN, STREAM_EVAL, STREAM_LABEL = 0, 1, 2, 3


def stage_key(seed: int, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stream)


def epoch_order(n: int, batch: int, seed: int, field: str, what: str = "prompts"
                ) -> EpochOrder:
    """The seeded epoch order of ``n`` training examples (``what``) in batches of ``batch``, with
    a warning naming ``field`` when a batch exceeds them (then every step repeats some)."""
    if batch > n:
        progress.message(f"warning: {field} {batch} exceeds the {n} training {what}: every "
                         f"step repeats some of them (distinct {what} per step need ≤ {n})")
    return EpochOrder(n, batch, seed)


def check_context(model: ModelConfig, task: TaskConfig, field: str = "task.max_new_tokens") -> None:
    check(task.prompt_len + task.max_new_tokens <= model.max_len, field,
          f"prompt_len {task.prompt_len} + max_new_tokens {task.max_new_tokens} exceeds the "
          f"model context {model.max_len}")


def check_prompts_fit(task: Task, shapes: TaskConfig, field: str = "task.prompt_len") -> None:
    """The task has held-out prompts, and every prompt (train and held-out) and knowledge probe,
    as the model reads it (``with_bos``), fits ``shapes.prompt_len``: checked before any work,
    since the first to read one too long is the evaluation after training, and a changed
    ``prompt_len`` is another config (the run's work could not be resumed under it)."""
    heldout = task.prompts("heldout")
    check(len(heldout) > 0, "task", f"task {task.name!r} has no held-out prompts: every "
          "evaluation would average nothing (gold 0, rates NaN); check its options")
    tok = task.tokenizer
    texts = [p.text for p in task.prompts("train")] + [p.text for p in heldout]
    texts += [prefix for prefix, _ in task.knowledge_probes("heldout")]
    n, text = max((len(with_bos(tok, tok.encode(t))), t) for t in texts)
    check(n <= shapes.prompt_len, field,
          f"the task's longest prompt ({text[:40]!r}) is {n} tokens (BOS included), more than "
          f"prompt_len {shapes.prompt_len}: give at least {n}")
    if task.demonstrations:   # SFT's rows hold a demonstration + EOS in max_new_tokens; SFT
        rng = np.random.default_rng(0)   # draws its own, so one per prompt is a sample
        n, text = max((len(tok.encode(d)) + 1, d) for d in
                      (task.demonstration(p, rng) for p in task.prompts("train")))
        check(n <= shapes.max_new_tokens, "task.max_new_tokens",
              f"the task's demonstrations run to {n} tokens (EOS included; e.g. {text[:40]!r}), "
              f"more than max_new_tokens {shapes.max_new_tokens}, which holds SFT's responses: "
              f"give at least {n}")


def upstream_run(given: str, default: Path, script: str, default_cfg, field: str, *,
                 flags=None) -> Path:
    """The finished run a stage starts from: ``given`` (must hold a finished run, else an error
    naming ``field``), or a default run of ``experiments/<script>.py`` with ``default_cfg`` into
    ``default`` unless one already finished there (then reused, and said so).

    A reused run must not contradict the command: a default run whose config differs from
    ``default_cfg``, or a ``given`` one that differs in an upstream flag set on the command line
    (``flags``, default ``default_cfg``: the fields that differ from the class defaults), is
    refused naming the fields, since those flags would otherwise be dropped silently."""
    path = Path(given) if given else default
    if (path / "summary.json").exists():
        _check_reused(path, script, default_cfg, flags or default_cfg, field, bool(given))
        progress.reused(script, path)
    elif given:
        check(False, field, f"{path} holds no finished run (no summary.json)")
    else:
        scripts.run(script, default_cfg, path)
    return path


def _resolved(config: dict, name: str) -> bool:
    """Whether dotted ``name`` is a field a stage fills in when it runs: an upstream directory
    left empty in ``config`` (and the upstream's config beside it), or the model's vocabulary
    (the task tokenizer's size)."""
    value = functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None,
                             name.split("."), config)
    return (name.endswith("_dir") and value == "") or name.endswith("model.vocab_size")


def _check_reused(path: Path, script: str, cfg, flags, field: str, given: bool) -> None:
    stored = read_config_json(path / "config.json")
    missing = [f.name for f in dataclasses.fields(cfg)
               if dataclasses.is_dataclass(getattr(cfg, f.name)) and f.name not in stored]
    check(not missing, field, f"{path} is not a finished {script} run: its config.json has no "
          f"{', '.join(missing)}")
    new = dataclasses.asdict(cfg)
    diff = [d for d in config_differences(stored, cfg) if not _resolved(new, d)]
    if given:   # only the upstream flags set on the command line can contradict a given run
        user = set(config_differences(dataclasses.asdict(type(flags)()), flags))
        diff = [d for d in diff if d in user]
    check(not diff, field,
          f"the finished run {path} it reuses was made with other settings than this command's: "
          f"{', '.join(diff[:10])} — drop those flags (the run's own config is used), or use "
          "another directory" if given else
          f"the finished upstream run {path} was made with other settings than this command's: "
          f"{', '.join(diff[:10])} — use the same options, or a new output directory")


def read_config(run_dir: str | Path, config_cls: type):
    """The config a stage run was written with (its ``config.json``)."""
    return from_dict(config_cls, json.loads((Path(run_dir) / "config.json").read_text()))


def model_config(pre_cfg) -> ModelConfig:
    """The architecture of a pipeline whose pretraining config is ``pre_cfg``: the imported
    checkpoint's (``init_from``) or ``pre_cfg.model``."""
    return load_config(pre_cfg.init_from)[0] if pre_cfg.init_from else pre_cfg.model


def pipeline_task(pre_cfg) -> Task:
    """The task of a pipeline whose pretraining config is ``pre_cfg``, with the imported
    checkpoint's tokenizer when it has a ``tokenizer.json``."""
    tok = None
    if pre_cfg.init_from and (Path(pre_cfg.init_from) / "tokenizer.json").exists():
        tok = HFTokenizer.from_pretrained(pre_cfg.init_from)
    return build_task(pre_cfg.task, tokenizer=tok)


def load_stage(run_dir: str | Path, config_cls: type, *, heads: tuple[str, ...] = (),
               config_of=lambda cfg: cfg):
    """``(config, Model, params)`` of a finished stage run (its ``config.json`` and ``params/``);
    ``config_of(config)`` is the config holding the ``model`` field (e.g. an SFT run's pretrain)."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").exists():
        raise FileNotFoundError(f"{run_dir} holds no finished run (no summary.json)")
    cfg = read_config(run_dir, config_cls)
    model, target = create_model(model_config(config_of(cfg)), jax.random.key(0), heads=heads)
    return cfg, model, load_params(run_dir / "params", target)


def eval_key(seed: int) -> jax.Array:
    """The held-out evaluation key of a pipeline seeded ``seed``: every stage evaluates with the
    pretraining seed's key, so SFT and any later policy are paired by prompt and sample index."""
    return stage_key(seed, STREAM_EVAL)


def train_stage(params, loss_fn, batch_at, *, seed: int, steps: int, optim: OptimConfig,
                run: RunDir, prefix: str, log_every: int, checkpoint_every: int, mesh=None,
                fsdp: bool = False, on_step=None, frozen=None):
    """Train ``params`` on ``loss_fn(params, batch, key, axis_name=...)`` with host batches
    ``batch_at(step)``, data-parallel over ``mesh`` (default: every device; batches split on their
    first axis; parameters and optimizer state replicated, or split over devices with ``fsdp``):
    resumes from ``run``'s checkpoints, saves the final parameters to ``run/params``.
    ``on_step(done, params)`` (optional) runs after every step with the current parameters
    (replicated); a dict it returns is logged at that step (``loop.fit``).

    The caller's ``params`` stay valid: the state starts from a copy, because the jitted step
    donates its state and ``params`` may share buffers with another model (``transplant``)."""
    mesh = make_mesh() if mesh is None else mesh
    params = jax.tree.map(lambda x: x.copy(), params)
    # under FSDP the step clips by the global norm itself (optax's clip would see only shards)
    tx = make_optimizer(dataclasses.replace(optim, clip_norm=0.0) if fsdp else optim, steps,
                        frozen=frozen)
    state = TrainState.create(params, tx)
    ckpt = Checkpointer(run.path / "checkpoints")
    loss_fn = functools.partial(loss_fn, axis_name=AXIS)
    if fsdp:
        specs = fsdp_specs(state.params, mesh)
        state_spec = state_specs(state, specs)
        train_step = make_fsdp_train_step(loss_fn, specs, clip_norm=optim.clip_norm)
    else:
        state_spec, train_step = P(), make_train_step(loss_fn)
    key = stage_key(seed, STREAM_TRAIN)
    state = place(resume(state, ckpt, run, key, stage=prefix), mesh, state_spec)
    step = data_parallel(train_step, mesh, state_spec=state_spec)
    hook = None
    if on_step is not None:
        def hook(done, st):
            return on_step(done, unshard(st.params, mesh) if fsdp else st.params)
    state = fit(state, step, lambda s: shard_batch(batch_at(s), mesh), steps=steps, key=key,
                run=run, prefix=prefix, log_every=log_every, checkpoint_every=checkpoint_every,
                ckpt=ckpt, on_nonfinite=optim.on_nonfinite, on_step=hook)
    ckpt.close()
    params = unshard(state.params, mesh)
    save_params(run.path / "params", params)
    return params
