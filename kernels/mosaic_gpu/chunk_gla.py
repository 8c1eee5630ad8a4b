"""Public entry of the Mosaic GPU GLA kernels: ``chunk_gla`` (validation, padding and layout, ``jax.custom_vjp``).

Forward: gate factors and the masked intra-chunk matrix A in XLA (float32, ``gla_jax.ops.chunk``'s two-level
form), then two Mosaic GPU kernels: the state pass (``states.py``) and the output products (``products.py``).
Backward: the state-gradient pass and dv as the same two Mosaic GPU kernels, dq/dk/dg in XLA with float32 matmuls
(``grads.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gla_jax.ops import chunk as xla_chunk  # shared two-level building blocks (jax-only module)
from gla_jax.ops.checks import check_kernel_inputs  # the operator's input contract (a jax-only leaf module)
from gla_jax.ops.chunk_math import SUB_CHUNK
from gla_jax.ops.segments import segment_starts

from .grads import qkg_grads
from .products import chunk_products
from .states import state_pass
from .tiles import CHUNK, F32, check_smem, padded_width

#: Input dtypes the kernels take (wgmma's 16-bit operand types).
DTYPES = ("bfloat16", "float16")


def _to_chunks(x, C):
    """[B, T, H, D] -> [B, H, N, C, D]."""
    B, T, H, D = x.shape
    return x.reshape(B, T // C, C, H, D).transpose(0, 3, 1, 2, 4)


def _from_chunks(x):
    """[B, H, N, C, D] -> [B, N·C, H, D]."""
    B, H, N, C, D = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(B, N * C, H, D)


def _swap(x):
    """[..., C, K] -> [..., K, C] (the gated keys/queries as wgmma's left operand of the state pass)."""
    return jnp.swapaxes(x, -1, -2)


def _prepare(q, k, g, doc, scale, dt):
    """Gate factors and the operands shared by forward and backward."""
    F, masks = xla_chunk._factors(g, doc, SUB_CHUNK)
    same = None if masks is None else masks[3]
    qdec = (q.astype(F32) * F.eq * scale).astype(dt)  # scale q ⊙ e^{b} (rows of later documents zeroed)
    kdec = (k.astype(F32) * F.ek).astype(dt)  # k ⊙ e^{b_C - b} (rows of earlier documents zeroed)
    return F, same, qdec, kdec


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _core(q, k, v, g, s0, doc, scale, interpret, staged):
    return _forward(q, k, v, g, s0, doc, scale, interpret, staged)[0]


def _forward(q, k, v, g, s0, doc, scale, interpret, staged):
    dt = v.dtype
    F, same, qdec, kdec = _prepare(q, k, g, doc, scale, dt)
    q6, k6 = q.astype(F32).reshape(F.b6.shape), k.astype(F32).reshape(F.b6.shape)
    A = xla_chunk._intra_matrix(q6, k6, F, dt, same) * scale  # [B, H, N, C, C] float32, masked
    starts, s_final = state_pass(_swap(kdec), v, F.a, s0, reverse=False, interpret=interpret, staged=staged)
    o = chunk_products(A.astype(dt), v, qdec, starts, out_dtype=dt, interpret=interpret)
    return (o, s_final), (q, k, v, g, s0, doc, A, starts)


def _core_fwd(q, k, v, g, s0, doc, scale, interpret, staged):
    return _forward(q, k, v, g, s0, doc, scale, interpret, staged)


def _core_bwd(scale, interpret, staged, res, cotangents):
    q, k, v, g, s0, doc, A, starts = res
    do, dht = cotangents
    dt = v.dtype
    do = do.astype(dt)
    F, same, qdec, kdec = _prepare(q, k, g, doc, scale, dt)
    dh, ds0 = state_pass(_swap(qdec), do, F.a, dht.astype(F32), reverse=True, interpret=interpret, staged=staged)
    dv = chunk_products(_swap(A).astype(dt), do, kdec, dh, out_dtype=F32, interpret=interpret)
    dq, dk, dg = qkg_grads(q, k, v, do, F, same, starts, dh, scale=scale, c=SUB_CHUNK, cdt=F32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, ds0, None


_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "output_final_state", "interpret", "staged"))
def _chunk_gla(q, k, v, g, initial_state, segment_ids, *, scale, output_final_state, interpret, staged):
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = CHUNK
    Kp, Vp = padded_width(K), padded_width(V)
    Tp = -(-T // C) * C
    pad = lambda x, w: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, w - x.shape[-1])))
    # zero q/k/v on the padding add nothing; zero gates there keep the state
    g = g.astype(F32)  # zero gates (-inf) are exact through the factors (gla_jax.ops.gates)
    q_, k_, g_, v_ = (_to_chunks(pad(x, w), C) for x, w in ((q, Kp), (k, Kp), (g, Kp), (v, Vp)))
    if initial_state is None:
        s0 = jnp.zeros((B, H, Kp, Vp), F32)
    else:
        s0 = jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    doc = None
    if segment_ids is not None:  # running document index; the padding continues the last document
        doc = jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)
        doc = jnp.pad(doc, ((0, 0), (0, Tp - T)), mode="edge").reshape(B, Tp // C, C)
    o, ht = _core(q_, k_, v_, g_, s0, doc, scale, interpret, staged)
    o = _from_chunks(o)[:, :T, :, :V]
    return o, (ht[:, :, :K, :V] if output_final_state else None)


def chunk_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
              chunk_size=64, interpret=False, staged=None):
    """Chunkwise gated linear attention with Pallas Mosaic GPU kernels for Hopper (sm_90a), forward and
    ``custom_vjp`` backward.

    Args:
      q, k: [B, T, H, K] queries and keys; g: [B, T, H, K] log forget gates (<= 0; -inf is a zero gate, exact as
        in the other backends); v: [B, T, H, V]. q, k, v in bfloat16 or float16 (one dtype; wgmma's operand types);
        gates, states, the diagonal sub-blocks and every accumulation are float32. Any T, K, V (padded to 64).
      scale: query scale (default K ** -0.5).
      initial_state: [B, H, K, V] state before position 0 (belongs to the first document), or None.
      output_final_state: also return the state after the last position.
      segment_ids: [B, T] integer document ids (documents contiguous); the state restarts from zero at each
        document start.
      chunk_size: must be 64 (one wgmma tile; see ``tiles.py``).
      interpret: False: compile for the GPU. True: Mosaic GPU interpret mode on the CPU with race detection; or
        an ``InterpretGPUParams``.
      staged: keep the state pass's running state in SMEM rather than in the wgmma accumulator registers
        (default: on in interpret mode, whose interpreter lacks the register-accumulator rules; off on the GPU).

    Returns:
      (o [B, T, H, V] in the inputs' dtype, final_state [B, H, K, V] float32 or None). Differentiable in q, k, v,
      g and initial_state.
    """
    scale = check_kernel_inputs(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                                impl="mosaic_gpu", chunk_size=chunk_size)
    if chunk_size != CHUNK:
        raise ValueError(f"chunk_size: the Mosaic GPU kernels use chunks of {CHUNK} (one wgmma tile), got "
                         f"{chunk_size}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype).name not in DTYPES:
            raise ValueError(f"{name}: the Mosaic GPU kernels take bfloat16 or float16 (wgmma operands), got "
                             f"{jnp.dtype(x.dtype).name}; cast the inputs or use impl='triton' for float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"v: expected q, k and v in one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_smem(padded_width(q.shape[-1]), q.dtype)
    from .compat import interpret_params

    params = interpret_params(interpret)  # validates ``interpret``
    if staged is None:
        staged = params is not None
    if not isinstance(staged, bool):
        raise ValueError(f"staged: expected a bool or None, got {staged!r}")
    return _chunk_gla(q, k, v, g, initial_state, segment_ids, scale=float(scale),
                      output_final_state=bool(output_final_state), interpret=params, staged=staged)
