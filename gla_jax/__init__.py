"""gla-jax: Gated Linear Attention (Yang et al., 2023) in JAX, Pallas and Flax NNX."""

__version__ = "0.1.0"
