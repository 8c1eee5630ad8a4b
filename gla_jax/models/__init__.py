"""gla_jax.models."""
