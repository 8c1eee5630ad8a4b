"""Causal depthwise short convolution with SiLU (fla ``ShortConvolution``), segment- and cache-aware."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.sharding import param


class ShortConvolution(nnx.Module):
    """``y_t = act(Σ_{i<W} weight[:, i] · x_{t-W+1+i} + bias)`` per channel (``weight[:, W-1]`` taps ``x_t``).

    Parameters: ``.weight: [channels, kernel_size]`` (fla stores ``[channels, 1, kernel_size]``), ``.bias:
    [channels]`` when ``bias``. Calls take ``x: [B, T, C]`` and return ``(y [B, T, C], cache)`` where the cache is the
    last ``W-1`` inputs ``[B, W-1, C]`` (the state needed to continue the sequence) when ``output_final_state``,
    else ``None``.
    """

    def __init__(self, channels: int, kernel_size: int = 4, *, bias: bool = False, activation: str | None = "silu",
                 initializer_range: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                 axis_name: str | None = None, rngs: nnx.Rngs):
        if int(kernel_size) < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if activation not in (None, "silu", "swish"):
            raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
        self.channels = int(channels)
        self.kernel_size = int(kernel_size)
        self.activation = activation
        self.dtype = dtype
        self.weight = param(nnx.initializers.normal(initializer_range), rngs.params(),
                            (self.channels, self.kernel_size), param_dtype, (axis_name, None))
        self.bias = (param(nnx.initializers.zeros, None, (self.channels,), param_dtype, (axis_name,))
                     if bias else None)

    def __call__(self, x, *, segment_ids=None, cache=None, output_final_state: bool = False):
        """x: [B, T, C]; segment_ids: [B, T] int (no tap crosses a document start; ``cache`` belongs to the first
        document); cache: [B, W-1, C] inputs preceding x (default zeros)."""
        B, T, C = x.shape
        W = self.kernel_size
        if C != self.channels:
            raise ValueError(f"x: last axis must be {self.channels}, got shape {x.shape}")
        x = x.astype(self.dtype)
        if cache is None:
            cache = jnp.zeros((B, W - 1, C), x.dtype)
        elif cache.shape != (B, W - 1, C):
            raise ValueError(f"cache must have shape {(B, W - 1, C)}, got {cache.shape}")
        xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
        w = self.weight[...].astype(jnp.float32)
        if segment_ids is not None:
            segp = jnp.concatenate([jnp.repeat(segment_ids[:, :1], W - 1, axis=1), segment_ids], axis=1)
        acc = jnp.zeros((B, T, C), jnp.float32)
        for i in range(W):  # tap i reads x_{t-(W-1)+i} = xp[:, t + i]
            tap = xp[:, i:i + T].astype(jnp.float32)
            if segment_ids is not None and i < W - 1:
                tap = tap * (segp[:, i:i + T] == segment_ids)[..., None]
            acc = acc + tap * w[:, i]
        if self.bias is not None:
            acc = acc + self.bias[...].astype(jnp.float32)
        if self.activation is not None:
            acc = jax.nn.silu(acc)
        y = acc.astype(x.dtype)
        new_cache = None
        if output_final_state:
            new_cache = xp[:, T:] if W > 1 else xp[:, :0]
            if segment_ids is not None and W > 1:  # keep only the last document's inputs
                same = segp[:, T:] == segment_ids[:, -1:]
                new_cache = new_cache * same[..., None].astype(new_cache.dtype)
        return y, new_cache
