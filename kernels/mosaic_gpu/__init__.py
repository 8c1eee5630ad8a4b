"""Pallas Mosaic GPU kernels for chunkwise GLA on Hopper (``gla_jax.kernels.mosaic_gpu``). Needs only jax."""

from .chunk_gla import chunk_gla

__all__ = ["chunk_gla"]
