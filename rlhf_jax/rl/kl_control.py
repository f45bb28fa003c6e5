"""The KL coefficient β (fixed or adaptive) and running reward statistics, as pure state updates."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.ops import AxisName, masked_sum_and_count


def adaptive_kl_coef(kl_coef: jax.Array, kl: jax.Array, *, target: float, horizon: float,
                     n_steps: int | jax.Array) -> jax.Array:
    """Ziegler et al. 2019's proportional controller (``lm-human-preferences``' ``AdaptiveKLController``):

        e = clip(KL / KL_target − 1, −0.2, 0.2),   β ← β·(1 + e·n_steps / horizon),

    with ``KL`` the mean per-sequence KL of the iteration (the units of ``kl/per_sequence``) and
    ``n_steps`` the number of sequences it was measured on."""
    err = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + err * n_steps / horizon)


@flax.struct.dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations of every value seen (Chan et al.'s parallel
    update), for dividing rewards by a running std."""

    count: jax.Array
    mean: jax.Array
    m2: jax.Array

    @classmethod
    def create(cls) -> "RunningMoments":
        z = lambda: jnp.zeros((), jnp.float32)  # noqa: E731  (distinct buffers: donated)
        return cls(count=z(), mean=z(), m2=z())

    def update(self, x: jax.Array, mask: jax.Array | None = None, *,
               axis_name: AxisName = None) -> "RunningMoments":
        if mask is None:
            mask = jnp.ones_like(x)
        total, n = masked_sum_and_count(x, mask, axis_name=axis_name)
        mean_b = total / jnp.maximum(n, 1.0)
        m2_b, _ = masked_sum_and_count(jnp.square(x - mean_b), mask, axis_name=axis_name)
        count = self.count + n
        delta = mean_b - self.mean
        mean = self.mean + delta * n / jnp.maximum(count, 1.0)
        m2 = self.m2 + m2_b + jnp.square(delta) * self.count * n / jnp.maximum(count, 1.0)
        return RunningMoments(count=count, mean=mean, m2=m2)

    @property
    def std(self) -> jax.Array:
        return jnp.sqrt(self.m2 / jnp.maximum(self.count - 1.0, 1.0))
