"""RMSNorm (fla/LLaMA convention: computed in float32, ``weight`` initialised to ones)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.sharding import param


def rms_norm(x, weight=None, eps: float = 1e-6):
    """``x / sqrt(mean(x², -1) + eps) * weight`` computed in float32; returns float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y


class RMSNorm(nnx.Module):
    """RMS normalisation over the last axis of width ``dim``.

    ``x: [..., dim]`` -> same shape, in ``dtype`` (default: the input's dtype). Parameter ``.weight: [dim]``
    (``param_dtype``) when ``elementwise_affine``; the statistics are always float32.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, elementwise_affine: bool = True, dtype=None,
                 param_dtype=jnp.float32, axis_name: str | None = None, rngs: nnx.Rngs | None = None):
        if int(dim) <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self.eps = float(eps)
        self.dtype = dtype
        self.elementwise_affine = bool(elementwise_affine)
        self.weight = (param(nnx.initializers.ones, None, (self.dim,), param_dtype, (axis_name,))
                       if self.elementwise_affine else None)

    def __call__(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: last axis must be {self.dim}, got shape {x.shape}")
        w = self.weight[...] if self.weight is not None else None
        return rms_norm(x, w, self.eps).astype(self.dtype or x.dtype)
