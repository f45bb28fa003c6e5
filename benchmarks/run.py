#!/usr/bin/env python
"""Throughput benchmarks of rlhf_jax; prints ONE JSON line on stdout (progress on stderr).

``--workload reference`` runs exactly the workload of ``../shared/bench/trl_baseline.py`` (GPT-2
architecture, vocab 512, context 256, d_model 256, 4 layers, 4 heads, float32, random init,
synthetic tokens; the ``bench`` model preset) through the library's own code paths — the same
functions the experiment scripts run, never a benchmark-only fast path:

  sft   16 × 128 tokens, AdamW, clip 1.0: ``train.make_train_step(losses.lm.lm_loss_fn)`` under
        ``parallel.data_parallel`` (as ``stages.common.train_stage``)            -> tokens/s
  rm    16 pairs × 128, Bradley–Terry (``losses.reward``), reward at the last token -> pairs/s
  dpo   16 pairs, prompt 32 + completion 96, ``losses.preference.dpo_loss`` on the DPO stage's
        ``response_logps`` (each prompt forwarded once for its two completions, where TRL
        forwards it with each); reference log-probs recomputed every step (as TRL), and a
        precomputed variant                                                     -> pairs/s
  gen   64 prompts × 32 → 32 new tokens, T = 1, ``sampling.sample`` (KV cache)    -> new tokens/s
        and its share of the generation roofline (``benchmarks/roofline.py``: the least bytes
        and FLOPs of the call at the read bandwidth and matmul peak measured in the same run)
  ppo   64 prompts × 32, 32 new tokens forced (no EOS, as TRL), separate RM, value and reference
        models, 4 epochs × 4 minibatches of 16, π_old scored from the sampler's logits as TRL
        does (``PPOHParams.rescore_policy=False``): ``rl.ppo.make_iteration`` under
        ``data_parallel`` (as ``stages.ppo.sharded_iteration``)                   -> s/iteration
        split into generation / scoring / update by timing separately jitted pieces of the same
        functions (``sampling.sample``, ``rl.rollout.collect``); also with ``critic="shared"``.

Every step time is a median over repeated steps after warm-up, with ``block_until_ready`` before
every clock read. ``compile_s`` is the ahead-of-time ``lower().compile()`` time (JAX's persistent
compilation cache is on, so a second run mostly reads the cache). ``mfu`` = achieved FLOP/s ÷ the
matmul peak of the run's precision measured in the same run (median of a jitted 1024³ matmul,
f32 × f32 or bf16 × bf16 → f32; ``matmul_peak_gflops``, ``precision``), with FLOPs pinned at
6·N + 12·L·d·T per trained token (N = parameters of the trained model, T = its sequence length);
forward-only work (reference/RM passes, sampling) is not counted. ``peak_rss_mb`` is the process's
maximum resident set (``resource.getrusage``).

``--workload default`` times each stage of the embedded-task pipeline (pretrain, SFT, RM, PPO):
it runs the main job's code (``experiments/pipeline.py``, default configs) with a few steps
per stage into a temporary directory, timing every call of the step functions the stages build;
per stage the median step time after the first (compiling) steps.

The process re-executes itself under the experiments' glibc allocator settings
(``rlhf_jax.launch``) before JAX is imported.

    python benchmarks/run.py --workload reference            # about 3-5 minutes on 2 cores
    python benchmarks/run.py --workload reference --quick --only sft,gen
    python benchmarks/run.py --workload default --quick
    python benchmarks/run.py --workload gpt2-small           # 124M GPT-2: benchmarks/gpt2_small.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # allocator settings must be in place before JAX is imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rlhf_jax import launch

    launch.reexec_with_allocator_env()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

WORKLOADS = ("sft", "rm", "dpo", "gen", "ppo", "ppo_shared")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Shapes:
    """Every shape of the reference workload (``trl_baseline.py``); ``TINY`` for smoke tests."""

    model: str = "bench"          # rlhf_jax.models.config preset
    sft_batch: int = 16
    sft_len: int = 128
    rm_pairs: int = 16
    rm_len: int = 128
    dpo_pairs: int = 16
    dpo_prompt: int = 32
    dpo_completion: int = 96
    gen_prompts: int = 64
    gen_prompt_len: int = 32
    gen_new: int = 32
    ppo_prompts: int = 64
    ppo_prompt_len: int = 32
    ppo_new: int = 32
    ppo_epochs: int = 4
    ppo_minibatches: int = 4
    n_special: int = 4            # token ids below this are special (pad/eos/bos/unk), as TRL's
    learning_rate: float = 1e-5   # the TRL benches' learning rate
    dpo_beta: float = 0.1
    precision: str = "float32"    # the model config's precision (--precision)
    ppo_rescore: bool = False     # PPOHParams.rescore_policy (False: TRL's way; bf16 needs True)


REFERENCE = Shapes()
# a real-size model (``--model smollm2-135m``, ``qwen2.5-0.5b``): one step of each, small batches
SCALE = Shapes(sft_batch=4, sft_len=256, rm_pairs=4, rm_len=256, dpo_pairs=4, dpo_prompt=64,
               dpo_completion=192, gen_prompts=8, gen_prompt_len=64, gen_new=64, ppo_prompts=8,
               ppo_prompt_len=64, ppo_new=64, ppo_epochs=1, ppo_minibatches=1)
TINY = Shapes(model="test", sft_batch=4, sft_len=16, rm_pairs=4, rm_len=16, dpo_pairs=4,
              dpo_prompt=8, dpo_completion=8, gen_prompts=4, gen_prompt_len=8, gen_new=8,
              ppo_prompts=8, ppo_prompt_len=8, ppo_new=8, ppo_epochs=2, ppo_minibatches=2)

# (warm-up steps, timed steps), as trl_baseline.py
ITERS_FULL = {"sft": (3, 30), "rm": (3, 30), "dpo": (3, 30), "gen": (2, 20), "ppo": (1, 8)}
ITERS_QUICK = {"sft": (1, 3), "rm": (1, 3), "dpo": (1, 3), "gen": (1, 3), "ppo": (1, 2)}
ITERS_SCALE = {"sft": (1, 1), "rm": (1, 1), "dpo": (1, 1), "gen": (1, 1), "ppo": (1, 1)}


# ----------------------------------------------------------------------------- timing
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _sys_busy_s() -> float:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - (v[4] if len(v) > 4 else 0)) / _HZ
    except OSError:
        return float("nan")


def _snap():
    t = os.times()
    return time.perf_counter(), t.user + t.system, _sys_busy_s()


def time_steps(fn, carry, inputs, warmup: int, iters: int):
    """Run ``carry = fn(carry, inputs[i % len])`` warm-up + timed times; each call's outputs are
    ``block_until_ready`` before the clock is read. Returns (carry, step seconds, other-process
    CPU load per wall second over the timed steps)."""
    times, other, wall = [], 0.0, 0.0
    for i in range(warmup + iters):
        a = _snap()
        carry = jax.block_until_ready(fn(carry, inputs[i % len(inputs)]))
        b = _snap()
        if i >= warmup:
            times.append(b[0] - a[0])
            wall += b[0] - a[0]
            other += max(0.0, (b[2] - a[2]) - (b[1] - a[1]))
    return carry, times, round(other / max(wall, 1e-9), 2)


def summarize(times, units_per_step: float, unit: str, load: float) -> dict:
    med = statistics.median(times)
    return {unit: round(units_per_step / med, 2), "median_step_s": round(med, 5),
            "min_step_s": round(min(times), 5), "max_step_s": round(max(times), 5),
            "n_timed": len(times), "other_cpu_load": load}


def aot(fn, *args):
    """Ahead-of-time compile ``fn`` (a jitted function) for ``args``; returns (compiled, seconds)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, round(time.perf_counter() - t0, 3)


def matmul_peak_flops(n: int = 1024, reps: int = 20, precision: str = "float32") -> float:
    """Median FLOP/s of a jitted n×n×n matmul (2·n³ FLOPs): f32 × f32 → f32, or for ``bf16``
    bf16 × bf16 → f32 (``preferred_element_type``, as the bf16 models' matmuls)."""
    dt = jnp.bfloat16 if precision == "bf16" else jnp.float32
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dt)
    b = jax.random.normal(k2, (n, n), dt)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(reps + 3):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times[3:])


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """The pinned training-FLOPs formula: 6·N + 12·L·d·T per trained token."""
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


# ----------------------------------------------------------------------------- set-up helpers
def optim_config():
    from rlhf_jax.train import OptimConfig

    # TRL's Trainer defaults: AdamW(β2 = 0.999, weight decay 0), constant LR here, clip 1.0
    return OptimConfig(learning_rate=REFERENCE.learning_rate, warmup_steps=0, final_lr_frac=1.0,
                       weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)


def rand_tokens(rng: np.random.Generator, shape, sh: Shapes, vocab: int) -> np.ndarray:
    return rng.integers(sh.n_special, vocab, size=shape).astype(np.int32)


def train_step_fn(loss_fn, mesh, batch_spec=None):
    """The experiments' train step: ``data_parallel(make_train_step(loss_fn))`` (jit of a
    shard_map, state donated), as ``stages.common.train_stage`` builds it."""
    from jax.sharding import PartitionSpec as P

    from rlhf_jax.parallel import AXIS, data_parallel
    from rlhf_jax.train import make_train_step

    return data_parallel(make_train_step(functools.partial(loss_fn, axis_name=AXIS)), mesh,
                         batch_spec=P(AXIS) if batch_spec is None else batch_spec)


def new_train_state(params, steps: int):
    from rlhf_jax.train import TrainState, make_optimizer

    return TrainState.create(jax.tree.map(lambda x: x.copy(), params),
                             make_optimizer(optim_config(), steps))


def run_train_bench(name, loss_fn, params, batches, *, iters, units, unit, flops_per_step,
                    peak, mesh, batch_spec=None):
    from jax.sharding import PartitionSpec as P

    from rlhf_jax.parallel import AXIS, replicate, shard_batch

    warmup, timed = iters
    step = train_step_fn(loss_fn, mesh, batch_spec)
    state = replicate(new_train_state(params, warmup + timed + 1), mesh)
    batches = [shard_batch(b, mesh, P(AXIS) if batch_spec is None else batch_spec)
               for b in batches]
    keys = [jax.random.key(i) for i in range(len(batches))]
    compiled, compile_s = aot(step, state, batches[0], keys[0])
    inputs = list(zip(batches, keys))

    def one(st, bk):
        st, metrics = compiled(st, *bk)
        return st, metrics

    (state, metrics), times, load = time_steps(lambda c, bk: one(c[0], bk), (state, None),
                                               inputs, warmup, timed)
    r = summarize(times, units, unit, load)
    r["compile_s"] = compile_s
    r["mfu"] = round(flops_per_step / statistics.median(times) / peak, 4)
    r["loss"] = float(metrics["loss"])
    log(f"[run] {name}: {json.dumps(r)}")
    return r


# ----------------------------------------------------------------------------- workloads
def bench_sft(sh: Shapes, iters, peak, mesh):
    from rlhf_jax.losses.lm import lm_loss_fn
    from rlhf_jax.models import create_model
    from rlhf_jax.models.functional import count_params

    model, params = create_model(_model_cfg(sh), jax.random.key(0))
    rng = np.random.default_rng(0)
    b, t = sh.sft_batch, sh.sft_len
    batches = []
    for _ in range(4):
        tokens = rand_tokens(rng, (b, t), sh, model.cfg.vocab_size)
        ones = np.ones((b, t), np.int32)
        batches.append({"tokens": tokens, "attention_mask": ones, "loss_mask": ones})
    n = count_params(params)
    flops = flops_per_token(n, model.cfg.n_layers, model.cfg.d_model, t) * b * t
    r = run_train_bench("sft", functools.partial(lm_loss_fn, model=model), params, batches,
                        iters=iters, units=b * t, unit="tokens_per_s", flops_per_step=flops,
                        peak=peak, mesh=mesh)
    r["params"] = n
    return r


def bt_loss_fn(params, batch, key=None, *, model, axis_name=None):
    """Bradley–Terry on independent chosen/rejected rows (TRL's RewardTrainer): one forward of
    the ``[2N, T]`` rows, the reward head read at each row's last real token."""
    from rlhf_jax.losses.reward import bradley_terry_loss
    from rlhf_jax.models.readout import last_token_rewards

    del key
    n = batch["chosen"].shape[0]
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    r = last_token_rewards(model, params, tokens, mask, head="reward")
    return bradley_terry_loss(r[:n], r[n:], axis_name=axis_name)


def bench_rm(sh: Shapes, iters, peak, mesh):
    from rlhf_jax.models import create_model
    from rlhf_jax.models.functional import count_params

    model, params = create_model(_model_cfg(sh), jax.random.key(1), heads=("reward",))
    rng = np.random.default_rng(1)
    n, t = sh.rm_pairs, sh.rm_len
    ones = np.ones((n, t), np.int32)
    batches = [{"chosen": rand_tokens(rng, (n, t), sh, model.cfg.vocab_size),
                "rejected": rand_tokens(rng, (n, t), sh, model.cfg.vocab_size),
                "chosen_mask": ones, "rejected_mask": ones} for _ in range(4)]
    n_params = count_params(params)
    flops = flops_per_token(n_params, model.cfg.n_layers, model.cfg.d_model, t) * 2 * n * t
    return run_train_bench("rm", functools.partial(bt_loss_fn, model=model), params, batches,
                           iters=iters, units=n, unit="pairs_per_s", flops_per_step=flops,
                           peak=peak, mesh=mesh)


def _dpo_logps(model, params, batch):
    """Summed completion log-probs ``[N, 2]`` of each prompt's chosen and rejected completion,
    by the DPO stage's own ``stages.offline.response_logps`` (the prompt forwarded once per pair,
    the completions as its cached continuation: ``rlhf_jax.shared_prompt``)."""
    from rlhf_jax.stages.offline import response_logps

    return response_logps(model, params, batch["prompts"], batch["prompt_mask"],
                          batch["responses"], batch["response_mask"])


def dpo_loss_fn(params, batch, key=None, *, model, beta, axis_name=None):
    """DPO on ``prompts [N, P]`` with ``responses [N, 2, C]`` (chosen, rejected; sequence
    log-probs of the completion): reference log-probs recomputed every step from
    ``batch["ref_params"]`` (TRL's DPOTrainer with a reference model), or read from
    ``batch["ref_logp"]`` when precomputed."""
    from rlhf_jax.losses.preference import dpo_loss

    del key
    logp = _dpo_logps(model, params, batch)
    if "ref_logp" in batch:
        ref = batch["ref_logp"]
    else:
        ref = jax.lax.stop_gradient(_dpo_logps(model, batch["ref_params"], batch))
    kw = {"axis_name": axis_name} if "axis_name" in inspect.signature(dpo_loss).parameters else {}
    return dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta=beta, **kw)


def bench_dpo(sh: Shapes, iters, peak, mesh):
    from rlhf_jax.models import create_model
    from jax.sharding import PartitionSpec as P

    from rlhf_jax.models.functional import count_params
    from rlhf_jax.parallel import AXIS, replicate

    model, params = create_model(_model_cfg(sh), jax.random.key(0))
    ref_params = replicate(jax.tree.map(lambda x: x.copy(), params), mesh)
    rng = np.random.default_rng(2)
    n, p, c = sh.dpo_pairs, sh.dpo_prompt, sh.dpo_completion
    batches = []
    for _ in range(4):
        prompt = rand_tokens(rng, (n, p), sh, model.cfg.vocab_size)
        comp = rand_tokens(rng, (n, 2, c), sh, model.cfg.vocab_size)
        batches.append({"prompts": prompt, "prompt_mask": np.ones_like(prompt),
                        "responses": comp, "response_mask": np.ones_like(comp)})
    n_params = count_params(params)
    cfg = model.cfg
    # the pinned formula counts TRL's work: 2N rows of prompt + completion
    flops = flops_per_token(n_params, cfg.n_layers, cfg.d_model, p + c) * 2 * n * (p + c)
    # what the shared-prompt forward executes: N prompts + 2N completions (attention over the
    # same prompt + completion keys)
    executed = flops_per_token(n_params, cfg.n_layers, cfg.d_model, p + c) * n * (p + 2 * c)
    kw = dict(model=model, beta=sh.dpo_beta)
    # reference log-probs recomputed inside every step (TRL's DPOTrainer with a ref model)
    spec = {k: P(AXIS) for k in batches[0]} | {"ref_params": P()}
    r = run_train_bench("dpo", functools.partial(dpo_loss_fn, **kw),
                        params, [dict(b, ref_params=ref_params) for b in batches], iters=iters,
                        units=n, unit="pairs_per_s", flops_per_step=flops, peak=peak, mesh=mesh,
                        batch_spec=spec)
    # the pinned formula counts the trained (policy) tokens only; the step also runs the
    # reference's forward pass over the same tokens, a third of a trained token's FLOPs
    r["mfu_with_reference_forward"] = round(r["mfu"] * 4 / 3, 4)
    r["mfu_executed"] = round(r["mfu"] * executed / flops, 4)
    r["mfu_executed_with_reference_forward"] = round(r["mfu"] * 4 / 3 * executed / flops, 4)
    # precomputed: one reference pass over the data set before training, as a separate program
    ref_fn = jax.jit(functools.partial(_dpo_logps, model))
    pre = [dict(b, ref_logp=np.asarray(ref_fn(ref_params, b))) for b in batches]
    r2 = run_train_bench("dpo_precomputed", functools.partial(dpo_loss_fn, **kw), params, pre,
                         iters=iters, units=n, unit="pairs_per_s", flops_per_step=flops,
                         peak=peak, mesh=mesh)
    return r, r2


def bench_gen(sh: Shapes, iters, mesh):
    from rlhf_jax.models import create_model
    from rlhf_jax.sampling import SamplingConfig, sample

    model, params = create_model(_model_cfg(sh), jax.random.key(0))
    rng = np.random.default_rng(4)
    b, p, n = sh.gen_prompts, sh.gen_prompt_len, sh.gen_new
    cfg = SamplingConfig(max_new_tokens=n, temperature=1.0)
    # eos_id -1 never matches a sampled id: all n tokens are generated (HF: min_new_tokens = n)
    fn = jax.jit(functools.partial(sample, model, cfg=cfg, eos_id=-1, pad_id=0))
    prompts = [jnp.asarray(rand_tokens(rng, (b, p), sh, model.cfg.vocab_size)) for _ in range(4)]
    mask = jnp.ones((b, p), jnp.int32)
    keys = [jax.random.key(i) for i in range(4)]
    compiled, compile_s = aot(fn, params, prompts[0], mask, keys[0])
    out, times, load = time_steps(lambda c, pk: compiled(params, pk[0], mask, pk[1]), None,
                                  list(zip(prompts, keys)), *iters)
    assert out.tokens.shape == (b, n) and int(out.mask.sum()) == b * n
    r = summarize(times, b * n, "new_tokens_per_s", load)
    r["compile_s"] = compile_s
    log(f"[run] gen: {json.dumps(r)}")
    return r


def sibling(name: str):
    """A module of ``benchmarks/`` (``run.py`` may be loaded by path, as the tests do)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def gen_roofline(sh: Shapes, measured_s: float, peak: float, bandwidth: float) -> dict:
    """The ``gen`` bench's generation roofline (``benchmarks/roofline.py``) at the measured
    median call time, from the model's parameter shapes (no weights are made)."""
    from rlhf_jax.models import create_model

    cfg = _model_cfg(sh)
    shapes = jax.eval_shape(lambda k: create_model(cfg, k)[1], jax.random.key(0))
    return sibling("roofline").report(
        shapes, cfg, batch=sh.gen_prompts, prompt_len=sh.gen_prompt_len, new_tokens=sh.gen_new,
        measured_s=measured_s, peak_flops=peak, bandwidth=bandwidth)


def _ppo_setup(sh: Shapes, critic: str, mesh):
    from rlhf_jax.models import create_model
    from rlhf_jax.parallel import replicate
    from rlhf_jax.rl.kl_control import RunningMoments
    from rlhf_jax.rl.ppo import Frozen, Models, PPOHParams, PPOState

    cfg = _model_cfg(sh)
    policy_heads = ("value",) if critic == "shared" else ()
    policy, pparams = create_model(cfg, jax.random.key(0), heads=policy_heads)
    ref, ref_params = create_model(cfg, jax.random.key(0))          # = the policy's init
    rm, rm_params = create_model(cfg, jax.random.key(5), heads=("reward",))
    value, vparams = (create_model(cfg, jax.random.key(4), heads=("value",))
                      if critic == "separate" else (None, None))
    hp = PPOHParams(prompts_per_iter=sh.ppo_prompts, temperature=1.0, epochs=sh.ppo_epochs,
                    minibatches=sh.ppo_minibatches, no_eos_penalty=0.0, kl_coef=0.05,
                    critic=critic, rescore_policy=sh.ppo_rescore)  # False: as TRL, gen. logits
    steps = 10 ** 4
    state = PPOState(policy=new_train_state(pparams, steps),
                     value=None if vparams is None else new_train_state(vparams, steps),
                     kl_coef=jnp.asarray(hp.kl_coef, jnp.float32),
                     reward_moments=RunningMoments.create(), step=jnp.zeros((), jnp.int32))
    models = Models(policy=policy, ref=ref, rm=rm, value=value)
    return models, hp, replicate(state, mesh), replicate(Frozen(ref=ref_params, rm=rm_params), mesh)


def _ppo_batches(sh: Shapes, vocab: int, mesh, n: int = 4):
    from rlhf_jax.parallel import shard_batch

    rng = np.random.default_rng(3)
    b, p = sh.ppo_prompts, sh.ppo_prompt_len
    out = []
    for i in range(n):
        batch = {"prompts": rand_tokens(rng, (b, p), sh, vocab),
                 "prompt_mask": np.ones((b, p), np.int32),
                 "example_ids": np.arange(i * b, (i + 1) * b, dtype=np.int32)}
        out.append(shard_batch(batch, mesh))
    return out


def ppo_iteration_fn(models, hp, sh: Shapes, mesh):
    """``stages.ppo.sharded_iteration`` without its host-batch placement (so it can be compiled
    ahead of time): ``data_parallel(make_iteration(..., axis_name="data"))``."""
    from jax.sharding import PartitionSpec as P

    from rlhf_jax.parallel import AXIS, data_parallel
    from rlhf_jax.rl.ppo import make_iteration

    kw = dict(max_new_tokens=sh.ppo_new, eos_id=-1, pad_id=0)
    batch_spec = {"prompts": P(AXIS), "prompt_mask": P(AXIS), "example_ids": P(AXIS)}
    return data_parallel(make_iteration(models, hp, axis_name=AXIS, **kw), mesh,
                         batch_spec=batch_spec, frozen_spec=P(), out_specs=(P(), P(), P(AXIS)))


def bench_ppo(sh: Shapes, iters, peak, mesh, critic: str = "separate", phases: bool = True):
    from rlhf_jax.models.functional import count_params
    from rlhf_jax.rl.rollout import collect
    from rlhf_jax.sampling import SamplingConfig, sample

    models, hp, state, frozen = _ppo_setup(sh, critic, mesh)
    batches = _ppo_batches(sh, models.policy.cfg.vocab_size, mesh)
    keys = [jax.random.key(100 + i) for i in range(len(batches))]
    it = ppo_iteration_fn(models, hp, sh, mesh)
    compiled, compile_s = aot(it, state, frozen, batches[0], keys[0])
    (state, metrics, _), times, load = time_steps(lambda c, bk: compiled(c[0], frozen, *bk),
                                                  (state, None, None), list(zip(batches, keys)),
                                                  *iters)
    assert float(metrics["rollout/length"]) == sh.ppo_new, "PPO must generate every token"
    med = statistics.median(times)
    r = {"iter_s": round(med, 4), "min_iter_s": round(min(times), 4),
         "max_iter_s": round(max(times), 4), "n_timed": len(times), "other_cpu_load": load,
         "compile_s": compile_s, "episodes_per_s": round(sh.ppo_prompts / med, 2)}
    # trained tokens per iteration: every update forwards + backwards a minibatch of
    # [prompt | response] rows through the policy (and through the value model if separate)
    cfg = models.policy.cfg
    t = sh.ppo_prompt_len + sh.ppo_new
    rows = hp.epochs * hp.rollout_size
    flops = flops_per_token(count_params(state.policy.params), cfg.n_layers, cfg.d_model, t) * rows * t
    if critic == "separate":
        flops += flops_per_token(count_params(state.value.params), cfg.n_layers, cfg.d_model,
                                 t) * rows * t
    r["mfu"] = round(flops / med / peak, 4)
    if phases:
        sampling = SamplingConfig(max_new_tokens=sh.ppo_new, temperature=hp.temperature)
        value_model = models.value if critic == "separate" else models.policy

        def gen(st, batch, key):
            k_sample, _ = jax.random.split(key)
            return sample(models.policy, st.policy.params, batch["prompts"], batch["prompt_mask"],
                          k_sample, cfg=sampling, eos_id=-1, pad_id=0,
                          example_ids=batch["example_ids"])

        def rollout(st, batch, key):
            k_sample, _ = jax.random.split(key)
            vparams = st.value.params if critic == "separate" else st.policy.params
            return collect(models.policy, st.policy.params, models.ref, frozen.ref, models.rm,
                           frozen.rm, value_model, vparams, batch["prompts"],
                           batch["prompt_mask"], k_sample, batch["example_ids"],
                           sampling=sampling, eos_id=-1, pad_id=0,
                           rescore_policy=hp.rescore_policy)

        phase_t = {}
        for name, f in (("gen", gen), ("rollout", rollout)):
            c, _ = aot(jax.jit(f), state, batches[0], keys[0])
            _, ts, _ = time_steps(lambda _c, bk, c=c: c(state, *bk), None,
                                  list(zip(batches, keys)), *iters)
            phase_t[name] = statistics.median(ts)
        r["gen_s"] = round(phase_t["gen"], 4)
        r["scoring_s"] = round(phase_t["rollout"] - phase_t["gen"], 4)
        r["update_s"] = round(med - phase_t["rollout"], 4)
        r["phase_note"] = ("gen = jit(sampling.sample); scoring = jit(rollout.collect) - gen "
                           "(so the sampler's keeping of its logits for scoring counts as "
                           "scoring); update (+ GAE, diagnostics) = whole iteration - "
                           "jit(collect)")
    log(f"[run] ppo[{critic}]: {json.dumps(r)}")
    return r


def _model_cfg(sh: Shapes):
    from rlhf_jax.models.config import preset

    return preset(sh.model, precision=sh.precision)


# ----------------------------------------------------------------------------- default workload
def bench_default(quick: bool) -> dict:
    """Steps/s of each stage of the embedded-task pipeline, measured inside the stage code.

    Runs ``experiments/pipeline.py`` (the main job's code) with a few steps per stage into a
    temporary directory. The step functions the stages build (``loop.fit``'s ``step_fn`` for
    pretrain / SFT / RM, ``stages.ppo.sharded_iteration`` for PPO) are wrapped to block and time
    every call, so each stage reports the median step time after its first (compiling) steps.
    """
    import rlhf_jax.stages.common as common
    import rlhf_jax.stages.ppo as ppo_stage
    from rlhf_jax import scripts
    from rlhf_jax.stages.pipeline import PipelineConfig

    n, n_ppo, warm = (8, 3, 1) if quick else (30, 8, 2)
    times: dict[str, list[float]] = {}

    def timed(fn, name):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **kw))
            times.setdefault(name, []).append(time.perf_counter() - t0)
            return out
        return wrapped

    orig_fit, orig_iter = common.fit, ppo_stage.sharded_iteration

    def fit(state, step_fn, *a, prefix, **kw):
        return orig_fit(state, timed(step_fn, prefix), *a, prefix=prefix, **kw)

    def sharded_iteration(*a, **kw):
        return timed(orig_iter(*a, **kw), "ppo")

    base = PipelineConfig()
    short = lambda c, **kw: dataclasses.replace(  # noqa: E731
        c, log_every=kw.get("steps", kw.get("iterations")), checkpoint_every=0, **kw)
    cfg = dataclasses.replace(
        base,
        pretrain=short(base.pretrain, steps=n,
                       optim=dataclasses.replace(base.pretrain.optim, warmup_steps=1)),
        sft=short(base.sft, steps=n, optim=dataclasses.replace(base.sft.optim, warmup_steps=1)),
        reward=short(base.reward, steps=n,
                     optim=dataclasses.replace(base.reward.optim, warmup_steps=1)),
        ppo=short(base.ppo, iterations=n_ppo,
                  policy_optim=dataclasses.replace(base.ppo.policy_optim, warmup_steps=1),
                  value_optim=dataclasses.replace(base.ppo.value_optim, warmup_steps=1)))
    common.fit, ppo_stage.sharded_iteration = fit, sharded_iteration
    try:
        with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(sys.stderr):
            t0 = time.perf_counter()
            summary = scripts.load("pipeline").run(cfg, Path(d) / "pipeline")
            wall = time.perf_counter() - t0
    finally:
        common.fit, ppo_stage.sharded_iteration = orig_fit, orig_iter
    units = {"pretrain": "steps_per_s", "sft": "steps_per_s", "rm": "steps_per_s",
             "ppo": "iterations_per_s"}
    result = {}
    for name, ts in times.items():
        timed_ts = ts[warm:] or ts
        med = statistics.median(timed_ts)
        result[name] = {units.get(name, "steps_per_s"): round(1.0 / med, 3),
                        "median_step_s": round(med, 4), "first_step_s": round(ts[0], 3),
                        "n_timed": len(timed_ts)}
    result["pipeline_wall_s"] = round(wall, 1)
    result["stage_time_s"] = {k: round(v, 2) for k, v in summary.items()
                              if k.startswith("time_s/") and isinstance(v, (int, float))}
    return result


# ----------------------------------------------------------------------------- main
def _have_dpo() -> bool:
    try:
        from rlhf_jax.losses.preference import dpo_loss  # noqa: F401
        return True
    except ImportError:
        return False


def run_reference(sh: Shapes, quick: bool, only: list[str]) -> dict:
    from rlhf_jax.parallel import make_mesh

    iters = ITERS_SCALE if sh.model != REFERENCE.model and sh.model != TINY.model else (
        ITERS_QUICK if quick else ITERS_FULL)
    mesh = make_mesh(jax.devices()[:1])
    t0 = time.perf_counter()
    n_mm, reps = (256 if sh.model == TINY.model else 1024), (5 if quick else 20)
    peak = matmul_peak_flops(n_mm, reps=reps, precision=sh.precision)
    res: dict = {"precision": sh.precision, "matmul_peak_precision": sh.precision,
                 "matmul_peak_gflops": round(peak / 1e9, 1), "compile_s": {}, "mfu": {}}
    log(f"[run] {sh.precision} matmul peak {peak / 1e9:.1f} GFLOP/s")
    want = lambda w: not only or w in only  # noqa: E731
    detail = {}
    if want("sft"):
        r = bench_sft(sh, iters["sft"], peak, mesh)
        res["sft_tokens_per_s"], res["compile_s"]["sft"], res["mfu"]["sft"] = (
            r["tokens_per_s"], r["compile_s"], r["mfu"])
        detail["sft"] = r
    if want("rm"):
        r = bench_rm(sh, iters["rm"], peak, mesh)
        res["rm_pairs_per_s"], res["compile_s"]["rm"], res["mfu"]["rm"] = (
            r["pairs_per_s"], r["compile_s"], r["mfu"])
        detail["rm"] = r
    if want("gen"):
        bandwidth = sibling("roofline").read_bandwidth(
            (64 if sh.model == TINY.model else 512) << 20, reps=3 if quick else 8)
        r = bench_gen(sh, iters["gen"], mesh)
        res["gen_new_tokens_per_s"], res["compile_s"]["gen"] = r["new_tokens_per_s"], r["compile_s"]
        detail["gen"] = r
    if want("ppo"):
        r = bench_ppo(sh, iters["ppo"], peak, mesh, critic="separate")
        res["ppo_iter_s"] = r["iter_s"]
        res["ppo_phases_s"] = {k: r[k] for k in ("gen_s", "scoring_s", "update_s")}
        res["compile_s"]["ppo"], res["mfu"]["ppo"] = r["compile_s"], r["mfu"]
        detail["ppo"] = r
    if want("ppo_shared"):
        r = bench_ppo(sh, iters["ppo"], peak, mesh, critic="shared", phases=False)
        res["ppo_iter_s_shared_value"] = r["iter_s"]
        res["compile_s"]["ppo_shared_value"] = r["compile_s"]
        res["mfu"]["ppo_shared_value"] = r["mfu"]
        detail["ppo_shared_value"] = r
    if want("dpo"):
        if _have_dpo():
            r, r2 = bench_dpo(sh, iters["dpo"], peak, mesh)
            res["dpo_pairs_per_s"], res["compile_s"]["dpo"], res["mfu"]["dpo"] = (
                r["pairs_per_s"], r["compile_s"], r["mfu"])
            for k in ("with_reference_forward", "executed", "executed_with_reference_forward"):
                res["mfu"][f"dpo_{k}"] = r[f"mfu_{k}"]
            res["dpo_pairs_per_s_precomputed"] = r2["pairs_per_s"]
            res["compile_s"]["dpo_precomputed"] = r2["compile_s"]
            res["mfu"]["dpo_precomputed"] = r2["mfu"]
            detail["dpo"], detail["dpo_precomputed"] = r, r2
        else:
            res["dpo_error"] = "rlhf_jax.losses.preference.dpo_loss not available"
    # the peak is measured again at the end; MFU uses the larger (a busy machine lowers both)
    peak_end = matmul_peak_flops(n_mm, reps=reps, precision=sh.precision)
    res["matmul_peak_gflops_start_end"] = [round(peak / 1e9, 1), round(peak_end / 1e9, 1)]
    if peak_end > peak:
        scale = peak / peak_end
        res["mfu"] = {k: round(v * scale, 4) for k, v in res["mfu"].items()}
        for d in detail.values():
            for k in ("mfu", "mfu_with_reference_forward", "mfu_executed",
                      "mfu_executed_with_reference_forward"):
                if k in d:
                    d[k] = round(d[k] * scale, 4)
        res["matmul_peak_gflops"] = round(peak_end / 1e9, 1)
    if "gen" in detail:   # generation against its roofline: the larger peak, the run's bandwidth
        rl = gen_roofline(sh, detail["gen"]["median_step_s"], max(peak, peak_end), bandwidth)
        detail["gen"]["roofline"] = rl
        res["gen_of_bound"] = rl["of_bound"]
        res["read_bandwidth_gbs"] = rl["read_bandwidth_gbs"]
    res["detail"] = detail
    res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("reference", "default", "gpt2-small"),
                    default="reference", help="gpt2-small: benchmarks/gpt2_small.py")
    ap.add_argument("--quick", action="store_true", help="few timed steps (smoke run)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes and the 'test' model preset (for the smoke test)")
    ap.add_argument("--only", default="", help=f"comma list of {','.join(WORKLOADS)}")
    ap.add_argument("--model", default="",
                    help="a real-size model preset (smollm2-135m, qwen2.5-0.5b, gpt2, ...) with "
                         "random weights, run at the small SCALE shapes with one timed step each; "
                         "run one workload per process (--only) for its own peak RSS")
    ap.add_argument("--precision", choices=("float32", "bf16"), default=None,
                    help="the models' precision (bf16: bf16 matmul inputs, float32 accumulation; "
                         "mfu is relative to the same-run peak of a matmul of that precision, "
                         "bf16 x bf16 -> f32 for bf16); default float32, and "
                         "for gpt2-small both")
    a = ap.parse_args(argv)
    only = [s for s in a.only.split(",") if s]
    if a.workload == "gpt2-small":
        return _main_gpt2_small(a, only, ap)
    a.precision = a.precision or "float32"
    bad = [s for s in only if s not in WORKLOADS]
    if bad:
        ap.error(f"--only: unknown workload(s) {bad}; choose from {WORKLOADS}")

    from rlhf_jax import launch

    cache = launch.enable_compilation_cache()
    sh = TINY if a.tiny else dataclasses.replace(SCALE, model=a.model) if a.model else REFERENCE
    sh = dataclasses.replace(sh, precision=a.precision)
    head = {
        "bench": "rlhf_jax", "workload": a.workload, "quick": a.quick, "tiny": a.tiny,
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
                     "numpy": np.__version__},
        "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
        "allocator_env": {k: os.environ.get(k) for k in launch.ALLOCATOR_ENV},
        "compilation_cache": cache,
        "model": dataclasses.asdict(_model_cfg(sh)), "dtype": a.precision,
    }
    with contextlib.redirect_stdout(sys.stderr):   # stdout holds only the result line
        if a.workload == "reference":
            res = run_reference(sh, a.quick, only)
        else:
            res = {"stages": bench_default(a.quick)}
    res = {**head, **res,
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(json.dumps(res), flush=True)
    return res


def _main_gpt2_small(a, only, ap) -> dict:
    """``--workload gpt2-small``: one (workload, precision) in this process when both are given
    (``--only W --precision P``), else every pair, each in its own process."""
    gpt2_small = sibling("gpt2_small")
    from rlhf_jax import launch

    bad = [s for s in only if s not in gpt2_small.WORKLOADS]
    if bad:
        ap.error(f"--only: unknown gpt2-small workload(s) {bad}; choose from {gpt2_small.WORKLOADS}")
    head = {"bench": "rlhf_jax", "workload": "gpt2-small", "quick": a.quick, "tiny": a.tiny,
            "cpu": launch.cpu_record(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "versions": {"python": platform.python_version(), "jax": jax.__version__}}
    if len(only) == 1 and a.precision:
        launch.enable_compilation_cache()
        with contextlib.redirect_stdout(sys.stderr):
            row = gpt2_small.measure(sys.modules[__name__], only[0], a.precision, tiny=a.tiny,
                                     quick=a.quick)
        res = {**head, "row": {**row, "cpu": head["cpu"]},
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    else:
        precisions = [a.precision] if a.precision else list(gpt2_small.PRECISIONS)
        res = {**head, **gpt2_small.run_all(precisions, only or list(gpt2_small.WORKLOADS),
                                            tiny=a.tiny, quick=a.quick)}
    print(json.dumps(res), flush=True)
    return res


def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
