"""The Mamba (v1) selective scan, chunked so that forward and backward stay memory-safe at long T.

    h_t = exp(dt_t ⊙ A) ⊙ h_{t-1} + (dt_t ⊙ x_t) ⊗ B_t        h: [B, Dm, N] per step
    y_t = h_t · C_t + D ⊙ x_t,   then  y_t ⊙ silu(z_t)  when a gate z is given

The per-step state has Dm·N entries per token (a diagonal, input-dependent A; no matmul form as for the scalar
gate), so the memory of a plain ``lax.scan`` grows as T·Dm·N for the backward pass (every step's decay and state is
a residual). Here the sequence is cut into chunks of L steps (docs/design.md §9): an outer ``lax.scan`` over chunks
carries only the state h; its body, wrapped in ``jax.checkpoint``, runs one chunk as an associative scan (log-depth,
vectorized) and contracts the chunk's states with C at once, so the [L, B, Dm, N] states never leave the body. The
backward pass keeps the chunk-boundary states ([T/L, B, Dm, N]) and recomputes one chunk at a time: memory
O((T/L + L)·B·Dm·N) instead of O(T·B·Dm·N). All state arithmetic is float32.

``selective_scan_sequential`` is the plain one-step-at-a-time ``lax.scan`` (no chunking, no checkpoint), kept for
benchmarks and as the generation building block; ``selective_scan_step`` is one decoding step.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from gla_jax.ops.segments import segment_starts

_F32 = jnp.float32


def _keep(segment_ids, shape):
    """[B, T] float32: 0 where a new document starts (the state is dropped there), else 1."""
    if segment_ids is None:
        return jnp.ones(shape, _F32)
    if getattr(segment_ids, "shape", None) != shape or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids: expected an integer array of shape {shape} ([B, T]), got "
                         f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)} "
                         f"{getattr(segment_ids, 'shape', '')}")
    return 1.0 - segment_starts(segment_ids).astype(_F32)


def _check(x, dt, A, B, C, D, z, initial_state, chunk_size):
    for name, a in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if not hasattr(a, "shape") or not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating array, got {getattr(a, 'dtype', type(a).__name__)}")
    if x.ndim != 3:
        raise ValueError(f"x: expected rank 3 ([B, T, Dm]), got shape {x.shape}")
    Bb, T, Dm = x.shape
    if dt.shape != x.shape:
        raise ValueError(f"dt: expected shape {x.shape} (same as x [B, T, Dm]), got {dt.shape}")
    if A.ndim != 2 or A.shape[0] != Dm:
        raise ValueError(f"A: expected shape ({Dm}, N) ([Dm, N]), got {A.shape}")
    N = A.shape[1]
    for name, a in (("B", B), ("C", C)):
        if a.shape != (Bb, T, N):
            raise ValueError(f"{name}: expected shape {(Bb, T, N)} ([B, T, N]), got {a.shape}")
    if D is not None and getattr(D, "shape", None) != (Dm,):
        raise ValueError(f"D: expected shape {(Dm,)} ([Dm]) or None, got {getattr(D, 'shape', D)}")
    if z is not None and getattr(z, "shape", None) != x.shape:
        raise ValueError(f"z: expected shape {x.shape} (same as x) or None, got {getattr(z, 'shape', z)}")
    if initial_state is not None and getattr(initial_state, "shape", None) != (Bb, Dm, N):
        raise ValueError(f"initial_state: expected shape {(Bb, Dm, N)} ([B, Dm, N]), got "
                         f"{getattr(initial_state, 'shape', initial_state)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    return Bb, T, Dm, N


def _finish(y, x, D, z, out_dtype):
    """Skip connection and output gate: y + D x, times silu(z); float32 in, ``out_dtype`` out."""
    if D is not None:
        y = y + x.astype(_F32) * D.astype(_F32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(_F32))
    return y.astype(out_dtype)


def _combine(left, right):
    """Composition of two affine maps h -> a h + b (left applied first)."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _step(A, h, xs):
    """One step: h = keep e^{dt A} h + dt x B, y = h · C (float32); keep = 0 where a document starts."""
    x_t, dt_t, b_t, c_t, keep_t = xs
    h = jnp.exp(dt_t[..., None] * A) * keep_t[:, None, None] * h + (dt_t * x_t)[..., None] * b_t[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, c_t, precision=lax.Precision.HIGHEST)


def _chunk_sequential(A, h, xs):
    """One chunk step by step (a ``lax.scan`` over its L steps); same contract as :func:`_chunk`."""
    return lax.scan(lambda h, x: _step(A, h, x), h, xs)


def _chunk(A, h, xs):
    """One chunk: xs = (x, dt, B, C, keep) each [L, B, ...] float32; returns (state after the chunk, y [L, B, Dm])."""
    x, dt, Bm, Cm, keep = xs
    decay = jnp.exp(dt[..., None] * A) * keep[:, :, None, None]  # [L, B, Dm, N]
    inp = (dt * x)[..., None] * Bm[:, :, None, :]
    a_cum, b_cum = lax.associative_scan(_combine, (decay, inp), axis=0)
    hs = a_cum * h[None] + b_cum
    y = jnp.einsum("lbdn,lbn->lbd", hs, Cm, precision=lax.Precision.HIGHEST)
    return hs[-1], y


def selective_scan(x, dt, A, B, C, D=None, z=None, *, initial_state=None, output_final_state=False, chunk_size=64,
                   inner="auto", segment_ids=None):
    """Chunked selective scan, differentiable, memory O((T/L + L)·B·Dm·N) in the backward pass (L = chunk_size).

    Args:
      x: [B, T, Dm] inputs; dt: [B, T, Dm] positive step sizes (after the bias and softplus).
      A: [Dm, N] continuous-time state matrix (negative: -exp(A_log)).
      B, C: [B, T, N] input and output projections of the state.
      D: [Dm] skip weights or None; z: [B, T, Dm] output gate (y ⊙ silu(z)) or None.
      initial_state: [B, Dm, N] or None (zeros); it belongs to the first document.
      output_final_state: also return the state after the last step.
      segment_ids: [B, T] integer document ids of packed rows or None; the state is zeroed at each document start.
      chunk_size: steps per checkpointed chunk.
      inner: how a chunk is computed: "associative" (log-depth ``associative_scan``, for accelerators),
        "sequential" (a ``lax.scan`` over the chunk's steps, faster on CPU) or "auto" (sequential on CPU).

    Returns:
      (y [B, T, Dm] in x's dtype, final state [B, Dm, N] float32 or None).
    """
    Bb, T, Dm, N = _check(x, dt, A, B, C, D, z, initial_state, chunk_size)
    if inner not in ("auto", "associative", "sequential"):
        raise ValueError(f"inner: expected 'auto', 'associative' or 'sequential', got {inner!r}")
    if inner == "auto":
        inner = "sequential" if jax.default_backend() == "cpu" else "associative"
    chunk_fn = _chunk if inner == "associative" else _chunk_sequential
    L = min(int(chunk_size), T)
    n = math.ceil(T / L)
    pad = n * L - T

    def chunks(a):  # [B, T, ...] -> [n, L, B, ...] float32; padding has dt = 0: the state passes unchanged
        a = a.astype(_F32)
        if pad:
            a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((Bb, n, L) + a.shape[2:]), (1, 2), (0, 1))

    h0 = jnp.zeros((Bb, Dm, N), _F32) if initial_state is None else initial_state.astype(_F32)
    body = jax.checkpoint(lambda h, xs: chunk_fn(A.astype(_F32), h, xs))
    keep = _keep(segment_ids, (Bb, T))
    if pad:
        keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=1.0)
    keep = jnp.moveaxis(keep.reshape(Bb, n, L), (1, 2), (0, 1))
    h, y = lax.scan(body, h0, (chunks(x), chunks(dt), chunks(B), chunks(C), keep))
    y = jnp.moveaxis(y, 2, 0).reshape(Bb, n * L, Dm)[:, :T]
    return _finish(y, x, D, z, x.dtype), (h if output_final_state else None)


def selective_scan_sequential(x, dt, A, B, C, D=None, z=None, *, initial_state=None, output_final_state=False,
                              segment_ids=None):
    """The same scan as a plain ``lax.scan`` over single steps (no chunks, no checkpoint). Same arguments/returns
    as :func:`selective_scan`; its backward keeps every step's state (memory O(T·B·Dm·N))."""
    Bb, T, Dm, N = _check(x, dt, A, B, C, D, z, initial_state, None)
    A32 = A.astype(_F32)
    h0 = jnp.zeros((Bb, Dm, N), _F32) if initial_state is None else initial_state.astype(_F32)
    xs = tuple(jnp.moveaxis(a.astype(_F32), 1, 0) for a in (x, dt, B, C, _keep(segment_ids, (Bb, T))))
    h, y = lax.scan(lambda h, x: _step(A32, h, x), h0, xs)
    return _finish(jnp.moveaxis(y, 0, 1), x, D, z, x.dtype), (h if output_final_state else None)


def selective_scan_step(x, dt, A, B, C, D, z, state):
    """One decoding step. x, dt, z: [B, Dm] (z may be None); B, C: [B, N]; D: [Dm] or None; state: [B, Dm, N].
    Returns (y [B, Dm] in x's dtype, new state [B, Dm, N] float32)."""
    if x.ndim != 2 or dt.shape != x.shape:
        raise ValueError(f"x/dt: expected equal shapes [B, Dm], got {x.shape} and {dt.shape}")
    if state.shape != (x.shape[0], x.shape[1], A.shape[1]):
        raise ValueError(f"state: expected shape {(x.shape[0], x.shape[1], A.shape[1])}, got {state.shape}")
    f = _F32
    h = (jnp.exp(dt.astype(f)[..., None] * A.astype(f)) * state.astype(f)
         + (dt.astype(f) * x.astype(f))[..., None] * B.astype(f)[:, None, :])
    y = jnp.einsum("bdn,bn->bd", h, C.astype(f), precision=lax.Precision.HIGHEST)
    return _finish(y, x, D, z, x.dtype), h
