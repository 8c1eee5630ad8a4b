"""Trace-time validation of the GLA operator's inputs (shapes, dtypes, options).

Every failure is a one-line ``ValueError`` that names the argument and what was expected. Values (for example
that gates are <= 0) cannot be checked under ``jit``; they are documented instead.
"""

from __future__ import annotations

import jax.numpy as jnp

from gla_jax.ops import registry


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def query_scale(scale, head_k_dim: int) -> float:
    """The query scale an operator applies: ``scale`` (a validated Python number), or head_k_dim ** -0.5 when None."""
    return head_k_dim ** -0.5 if scale is None else float(scale)


def check_gla_inputs(q, k, v, g, *, scale, initial_state, segment_ids, impl, chunk_size):
    """Validates ``gla`` arguments; returns ``(B, T, H, K, V)``.

    q, k: [B, T, H, K] float; g: [B, T, H, K] or [B, T, H] (scalar gates) float; v: [B, T, H, V] float;
    initial_state: [B, H, K, V] or None; segment_ids: [B, T] integer or None; chunk_size: power of two >= 16 (the
    sub-chunk size).
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name}: expected an array, got {type(x).__name__}")
        if x.ndim != 4 and name != "g":  # g's shape is checked against q's below
            raise ValueError(f"{name}: expected rank 4 ([B, T, H, {'V' if name == 'v' else 'K'}]), got shape {x.shape}")
        if not _is_float(x):
            raise ValueError(f"{name}: expected a floating dtype (float32/bfloat16/float16/float64), got {x.dtype}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {q.shape} (same as q [B, T, H, K]), got {k.shape}")
    if g.shape != q.shape and g.shape != q.shape[:3]:
        raise ValueError(f"g: expected shape {q.shape} ([B, T, H, K], as q) or {q.shape[:3]} ([B, T, H], one gate "
                         f"per head and step), got {g.shape}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v: expected shape ({B}, {T}, {H}, V) to match q's [B, T, H], got {v.shape}")
    V = v.shape[3]
    if min(B, T, H, K, V) < 1:
        raise ValueError(f"q/v: every dimension must be >= 1, got q {q.shape}, v {v.shape}")
    if initial_state is not None:
        if not hasattr(initial_state, "shape") or initial_state.shape != (B, H, K, V):
            raise ValueError(
                f"initial_state: expected shape {(B, H, K, V)} ([B, H, K, V]), got "
                f"{getattr(initial_state, 'shape', type(initial_state).__name__)}"
            )
        if not _is_float(initial_state):
            raise ValueError(f"initial_state: expected a floating dtype, got {initial_state.dtype}")
    if segment_ids is not None:
        if not hasattr(segment_ids, "shape") or segment_ids.shape != (B, T):
            raise ValueError(
                f"segment_ids: expected shape {(B, T)} ([B, T]), got "
                f"{getattr(segment_ids, 'shape', type(segment_ids).__name__)}"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")
    registry.check_impl(impl)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of two >= 16, got {chunk_size!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise ValueError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return B, T, H, K, V


def check_kernel_inputs(q, k, v, g, *, scale, initial_state, segment_ids, impl, chunk_size) -> float:
    """A kernel package's public entry: validates like ``check_gla_inputs`` and returns the query scale to use
    (``query_scale``)."""
    check_gla_inputs(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids, impl=impl,
                     chunk_size=chunk_size)
    return query_scale(scale, q.shape[-1])
