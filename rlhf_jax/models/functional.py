"""The functional face of the NNX model: ``(graphdef, params)`` so jitted code is pure.

``Model`` holds only static things (config, graph definition). ``Model.apply(params, …)`` merges the
graph with a parameter ``nnx.State`` and runs it, so losses, samplers and train steps are pure
functions of the parameter pytree, which is what ``jax.jit``/``grad``/``shard_map`` and Orbax see.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from rlhf_jax.models.config import GPTConfig, LlamaConfig
from rlhf_jax.models.gpt2 import GPT, ModelOutput
from rlhf_jax.models.llama import Llama
from rlhf_jax.precision import check_precision

ModelConfig = GPTConfig | LlamaConfig
ARCHITECTURES: dict[type, type[nnx.Module]] = {GPTConfig: GPT, LlamaConfig: Llama}


@dataclasses.dataclass(frozen=True)
class Model:
    """Static half of a split NNX model: ``apply(params, tokens, **kw) -> ModelOutput``.

    ``source`` describes the Hugging Face checkpoint it was imported from, if any
    (:func:`rlhf_jax.models.hf.load_pretrained`); it does not take part in equality or hashing."""

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    heads: tuple[str, ...] = ()
    source: Any = None

    def apply(self, params: nnx.State, tokens: jax.Array, **kw) -> ModelOutput:
        return nnx.merge(self.graphdef, params)(tokens, **kw)

    __call__ = apply

    def init(self, key: jax.Array) -> nnx.State:
        """Fresh parameters for this architecture from ``key``."""
        return create_model(self.cfg, key, heads=self.heads)[1]

    def __hash__(self):  # usable as a static jit argument
        return hash((self.cfg, self.heads))

    def __eq__(self, other):
        return isinstance(other, Model) and (self.cfg, self.heads) == (other.cfg, other.heads)


def build_module(cfg: ModelConfig, rngs: nnx.Rngs, heads: tuple[str, ...] = ()) -> nnx.Module:
    """The decoder a config describes (``GPT`` or ``Llama``); a bf16 config on a CPU without
    native bf16 matmuls is refused (:func:`rlhf_jax.precision.check_precision`)."""
    check_precision(cfg.precision)
    return ARCHITECTURES[type(cfg)](cfg, rngs=rngs, heads=tuple(heads))


def create_model(cfg: ModelConfig, key: jax.Array, *, heads: tuple[str, ...] = ()
                 ) -> tuple[Model, nnx.State]:
    """Build the decoder ``cfg`` describes from ``key`` and split it into ``(Model, params)``."""
    module = build_module(cfg, nnx.Rngs(params=key), heads)
    graphdef, params = nnx.split(module)
    return Model(cfg, graphdef, tuple(heads)), params


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def transplant(src: nnx.State, dst: nnx.State, *, rename: dict[str, str] | None = None
               ) -> nnx.State:
    """``dst`` with every leaf that also exists in ``src`` (same path, same shape) taken from it.

    Used to start a reward or value model from the SFT trunk: the trunk comes from ``src``, the new
    scalar head keeps its fresh initialisation from ``dst``. ``rename`` maps path components of
    ``src`` to ``dst`` (``{"reward": "value"}`` starts a value head from a reward head).
    """
    rename = rename or {}
    src_flat = {tuple(rename.get(k, k) for k in path): var
                for path, var in nnx.to_flat_state(src)}
    out = []
    for path, var in nnx.to_flat_state(dst):
        if path in src_flat and src_flat[path][...].shape == var[...].shape:
            var = var.replace(src_flat[path][...])
        out.append((path, var))
    return nnx.from_flat_state(out)
