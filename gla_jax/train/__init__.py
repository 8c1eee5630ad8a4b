"""gla_jax.train."""
