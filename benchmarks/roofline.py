"""The generation roofline: the fastest ``sampling.sample`` could run on this machine.

Issue #26 grades generation by tokens/s against the memory-bandwidth bound of reading the weights
and the KV cache at every decoding step. One ``sample`` call of ``batch`` rows, prompts of
``prompt_len`` and ``new_tokens`` new tokens is a prefill (the prompt through the model once; its
last position gives the first new token) and ``new_tokens - 1`` decoding steps. The least work an
implementation can do, per phase:

- **bytes**: every weight the matmuls read, in the matmul dtype (float32, or bfloat16 under
  ``precision="bf16"``: the bytes of weights already cast), once per phase; plus the KV cache,
  written for the prompt in the prefill, and read over the valid slots (``prompt_len + i``,
  the new token's own included) at decoding step ``i``. Embedding tables that are only gathered
  (GPT-2's ``wpe``; the input table of an untied model) are not read whole and are not counted.
- **FLOPs**: 2 per weight and token through the layers, plus attention's 4·d_attn FLOPs per
  query and key slot (QKᵀ and PV; causal in the prefill). Only a drawn token needs the output
  layer, and in the prefill only the prompt's last position needs anything of the last layer
  but its keys and values (``sampling.sample`` runs that layer's attention output and MLP there
  alone, ``output_positions``): the last layer counts its K and V projections at every prompt
  position and the rest of its weights and its attention at the last one.

The bounds divide these by the machine's rates measured in the same run: the read bandwidth of an
array far larger than any cache (``read_bandwidth``) and the matmul peak of the run's precision.
``bandwidth`` is the issue's bound (all bytes at that bandwidth), ``compute`` all FLOPs at the
peak, and ``roofline`` the sum over phases of the slower of the two — the tightest of the three.
A read kernel's rate is a lower bound on the hardware's bandwidth and XLA runs attention over
every slot of the cache (``prompt_len + new_tokens - 1``), not the valid ones, so the bounds are
those of this measurement and of the least work, not of the silicon.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# embedding tables a decoding step gathers rows from (never reads whole): the positional one,
# and the input one when the output layer is a separate matrix
GATHERED = {"wpe": "always", "wte": "untied", "embed_tokens": "untied"}
LAYERS = ("h", "layers")            # the transformer blocks' parameters (GPT-2, Llama family)


def read_bandwidth(nbytes: int = 512 << 20, reps: int = 8) -> float:
    """Bytes/s of reading a float32 array of ``nbytes`` (default 512 MiB, several times any
    CPU's last-level cache): the faster of two jitted row sums, ``[2, n/2]`` and ``[n/4096,
    4096]`` (the layouts XLA:CPU reduced fastest of six tried on the AVX2 EPYC, 33–39 GB/s, where
    NumPy's one-thread sum read 14), each the median of ``reps`` calls."""
    n = nbytes // 4
    best = 0.0
    f = jax.jit(lambda a: jnp.sum(a, axis=1))
    for shape in ((2, n // 2), (n // 4096, 4096)):
        x = jnp.ones(shape, jnp.float32)
        jax.block_until_ready(f(x))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            times.append(time.perf_counter() - t0)
        best = max(best, x.size * 4 / statistics.median(times))
        del x
    return best


def _count(params, keep) -> int:
    n = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if keep(str(getattr(path[0], "key", path[0]))):
            n += int(np.prod(leaf.shape))
    return n


def weights_read(params, cfg) -> int:
    """Parameters a forward step reads whole: all but the gathered embedding tables."""
    def keep(top):
        rule = GATHERED.get(top)
        return not (rule == "always" or (rule == "untied" and not cfg.tie_embeddings))
    return _count(params, keep)


def layer_weights(params, cfg) -> int:
    """Parameters of one transformer block (weights, biases, norms)."""
    return _count(params, lambda top: top in LAYERS) // cfg.n_layers


def generation_work(params, cfg, *, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Least bytes and FLOPs of one ``sample`` call, per phase: ``prefill`` (numbers) and
    ``steps`` (lists of ``new_tokens - 1``: decoding steps 1 … n − 1)."""
    itemsize = 2 if cfg.precision == "bf16" else 4
    n_read = weights_read(params, cfg)
    layers = cfg.n_layers
    layer = layer_weights(params, cfg)
    kv = 2 * cfg.d_model * cfg.kv_heads * cfg.head_dim           # one layer's K and V weights
    d_attn = cfg.n_heads * cfg.head_dim
    slot = 2 * layers * cfg.kv_heads * cfg.head_dim * itemsize    # K and V of one token
    w_bytes = n_read * itemsize
    p = prompt_len
    once = n_read - layers * layer                # output layer, final norm: the last position
    prefill = {
        "bytes": w_bytes + batch * p * slot,
        "flops": batch * (2 * layer * p * (layers - 1) + 2 * kv * p + 2 * (layer - kv) + 2 * once
                          + 4 * d_attn * ((layers - 1) * p * (p + 1) / 2 + p)),
    }
    ctx = np.arange(1, new_tokens) + p                            # valid slots at step i
    steps = {
        "bytes": (w_bytes + batch * ctx * slot).tolist(),
        "flops": (batch * (2 * n_read + 4 * layers * d_attn * ctx)).astype(float).tolist(),
    }
    return {"weights_read": n_read, "layer_weights": layer, "weight_bytes": w_bytes,
            "kv_bytes_per_token": slot, "prefill": prefill, "steps": steps}


def bounds(work: dict, *, tokens: int, peak_flops: float, bandwidth: float) -> dict:
    """Seconds per call and tokens/s at each bound (``tokens`` = new tokens per call)."""
    phases = [(work["prefill"]["bytes"], work["prefill"]["flops"]),
              *zip(work["steps"]["bytes"], work["steps"]["flops"])]
    t = {"bandwidth": sum(b for b, _ in phases) / bandwidth,
         "compute": sum(f for _, f in phases) / peak_flops,
         "roofline": sum(max(b / bandwidth, f / peak_flops) for b, f in phases)}
    return {**{f"{k}_s": v for k, v in t.items()},
            **{f"{k}_new_tokens_per_s": tokens / v for k, v in t.items()}}


def report(params, cfg, *, batch: int, prompt_len: int, new_tokens: int, measured_s: float,
           peak_flops: float, bandwidth: float) -> dict:
    """The bounds of one measured ``sample`` call, and the measured rate as a share of each."""
    work = generation_work(params, cfg, batch=batch, prompt_len=prompt_len,
                           new_tokens=new_tokens)
    b = bounds(work, tokens=batch * new_tokens, peak_flops=peak_flops, bandwidth=bandwidth)
    steps = work["steps"]
    return {
        "read_bandwidth_gbs": round(bandwidth / 1e9, 2),
        "matmul_peak_gflops": round(peak_flops / 1e9, 1),
        "weight_bytes": work["weight_bytes"], "kv_bytes_per_token": work["kv_bytes_per_token"],
        "bytes_per_step_first_last": [steps["bytes"][0], steps["bytes"][-1]] if steps["bytes"]
        else [],
        "flops_per_call": round(work["prefill"]["flops"] + sum(steps["flops"])),
        **{k: round(v, 1) if k.endswith("per_s") else float(f"{v:.4g}") for k, v in b.items()},
        "of_bound": {k: round(b[f"{k}_s"] / measured_s, 4)
                     for k in ("bandwidth", "compute", "roofline")},
    }
