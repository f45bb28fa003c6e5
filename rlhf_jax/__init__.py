"""rlhf_jax: RLHF (SFT, reward models, PPO) as pure, jit-compiled JAX functions over Flax model states."""

__version__ = "0.1.0"
