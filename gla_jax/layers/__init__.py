"""gla_jax.layers."""
