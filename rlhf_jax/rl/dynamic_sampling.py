"""DAPO's dynamic sampling with static shapes (Yu et al. 2025, "DAPO", §3.2), inside the compiled
iteration.

The iteration samples ``prompts_per_iter`` groups of G responses (every one scored by the RM: all
of them count against the budget of RM-scored samples) and trains on ``keep`` of them: the first
``keep`` groups, in global batch order, whose sequence rewards have a standard deviation above
``1e-6`` (a group whose members all get the same reward has zero advantage and only dilutes the
token mean; "above a threshold", not exact inequality, so float noise does not count as spread).
When fewer than ``keep`` groups qualify, the slots left over are filled with the first groups that
do not, with weight 0 (their mask is zeroed: they add nothing to the loss nor to the token count
of its denominator), so every shape is static. ``rollout/fill_rate`` is the share of the ``keep``
slots filled with real groups.

The selection is made on the *global* batch: the groups' reward spreads and the training rows are
gathered across devices (``all_gather``), the selection is computed identically on every device,
and each device then takes its contiguous share of the selected rows. So the trained rows, their
order and the minibatch split are the same on N devices as on 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.ops import AxisName

SPREAD_EPS = 1e-6


def _gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else lax.all_gather(x, axis_name, tiled=True)


def select_groups(data: dict, seq_rewards: jax.Array, *, keep: int, group_size: int,
                  axis_name: AxisName = None, eps: float = SPREAD_EPS
                  ) -> tuple[dict, jax.Array, dict[str, jax.Array]]:
    """Keep ``keep`` groups of the global batch (see the module docstring).

    ``data``: this device's training rows, every leaf ``[R, ...]`` (R = local groups × G) with a
    ``"mask" [R, N]``; ``seq_rewards [R]``: each row's sequence reward. Returns ``(data', ids,
    metrics)``: this device's ``keep·G / n_devices`` selected rows (zero mask on padding groups),
    their positions ``ids`` in the global selection (for ``minibatch_indices``), and
    ``rollout/fill_rate`` (filled slots / keep) and ``rollout/groups_with_spread`` (share of the
    sampled groups with spread)."""
    r = seq_rewards.reshape(-1, group_size)                                    # [g_loc, G]
    local = jnp.std(r, axis=1) > eps                                           # [g_loc]
    spread = _gather(local, axis_name)                                         # [g_all]
    g_all = spread.shape[0]
    n_dev = g_all // r.shape[0]
    if keep > g_all:
        raise ValueError(f"ppo.keep_groups={keep} exceeds the {g_all} sampled groups")
    if keep % n_dev:
        raise ValueError(f"ppo.keep_groups={keep} does not divide over {n_dev} devices")
    chosen = jnp.argsort(~spread, stable=True)[:keep]     # spread groups first, in batch order
    weight = spread[chosen].astype(jnp.float32)                                # [keep]
    rows = (chosen[:, None] * group_size + jnp.arange(group_size)).reshape(-1)  # [keep·G]
    row_w = jnp.repeat(weight, group_size)
    per_dev = keep * group_size // n_dev
    start = 0 if axis_name is None else lax.axis_index(axis_name) * per_dev
    mine = lax.dynamic_slice_in_dim(rows, start, per_dev)
    out = jax.tree.map(lambda x: _gather(x, axis_name)[mine], data)
    w = lax.dynamic_slice_in_dim(row_w, start, per_dev)
    out["mask"] = out["mask"] * w[:, None].astype(out["mask"].dtype)
    n_spread = jnp.sum(local.astype(jnp.float32))   # psum-ed: the metrics are replicated
    n_spread = n_spread if axis_name is None else lax.psum(n_spread, axis_name)
    metrics = {"rollout/fill_rate": jnp.minimum(n_spread, keep) / keep,
               "rollout/groups_with_spread": n_spread / g_all}
    return out, start + jnp.arange(per_dev), metrics
