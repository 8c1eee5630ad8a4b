"""Rotary position embeddings (non-interleaved halves, the LLaMA/GPT-NeoX convention used by fla)."""

from __future__ import annotations

import jax.numpy as jnp


def rotary_angles(positions, dim: int, theta: float = 10000.0):
    """positions: [B, T] int -> (cos, sin) each [B, T, dim//2] float32, frequencies theta^(-2i/dim)."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(ang), jnp.sin(ang)


def apply_rotary(x, positions, theta: float = 10000.0):
    """x: [B, T, H, D] rotated by position; the pair (x[:D/2], x[D/2:]) is rotated. Same dtype as x."""
    D = x.shape[-1]
    cos, sin = rotary_angles(positions, D, theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : D // 2], x32[..., D // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
