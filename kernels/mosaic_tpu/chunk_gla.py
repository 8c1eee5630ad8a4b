"""Public entry of the Mosaic TPU GLA kernels: ``chunk_gla`` (validation, padding and layout, ``jax.custom_vjp``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from gla_jax.ops.checks import check_kernel_inputs  # the operator's input contract (a jax-only leaf module)
from gla_jax.ops.chunk_math import chunk_cumsum  # shared pure-jnp pieces (jax-only)
from gla_jax.ops.gates import is_zero_gate  # zero gates (alpha = 0): jax-only too

from .backward import backward
from .forward import chunk_states, forward
from .interpret_pool import warn_if_cpu_pool_too_small
from .tiling import LANE, Tiling, check_vmem, padded_width

F32 = jnp.float32


def interpret_params(interpret):
    """``interpret`` -> what ``pallas_call`` takes: False (compile for the TPU), or TPU interpret mode on the CPU:
    True means race detection on and uninitialised VMEM filled with NaN (a missing initialisation shows up);
    a ``pltpu.InterpretParams`` is used as given."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    if interpret is True:
        return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    if interpret is False or interpret is None:
        return False
    raise ValueError(f"interpret: expected a bool or pltpu.InterpretParams, got {interpret!r}")


def document_codes(segment_ids, C):
    """[B, T] ids -> (relc [B, T, 1], relr [B, 1, T]) int32 codes 2 rel + start: start = 1 at a document's first
    position (never at position 0), rel = starts from the chunk start up to and including the position."""
    B, T = segment_ids.shape
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    start = (segment_ids != prev).astype(jnp.int32)
    rel = jnp.cumsum(start.reshape(B, T // C, C), axis=2).reshape(B, T)
    code = 2 * rel + start
    return code[:, :, None], code[:, None, :]


def chunk_decay(gc, zc, seg, C):
    """[B, T, H, K] chunk-local cumulative gates and zero-gate steps -> [B, NT, H·K, 1] float32 e^{gate sum of each
    chunk} (0 in a channel with a zero gate in the chunk), 0 where a document starts inside the chunk (the incoming
    state does not survive it). A column per head, so the kernels
    scale the [K, V] state's rows without moving the gates from lanes to sublanes."""
    B, T, H, K = gc.shape
    decay = jnp.exp(gc[:, C - 1::C] + zc[:, C - 1::C])  # [B, NT, H, K]
    if seg is not None:
        relc = seg[0][:, C - 1::C, 0] >> 1  # [B, NT]: starts inside each chunk
        decay = jnp.where((relc == 0)[:, :, None, None], decay, 0.0)
    return decay.reshape(B, T // C, H * K, 1)


def _prepare(g, seg, C):
    B, T, H, K = g.shape
    gc, zc = chunk_cumsum(g, C)
    return gc.reshape(B, T, H * K), zc.reshape(B, T, H * K), chunk_decay(gc, zc, seg, C)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _gla_core(q, k, v, g, h0, seg, H, scale, tiling, interpret):
    gc, zc, decay = _prepare(g, seg, tiling.chunk_size)
    return forward(q, k, v, gc, zc, decay, h0, seg, H=H, scale=scale, tiling=tiling, interpret=interpret)


def _gla_core_fwd(q, k, v, g, h0, seg, H, scale, tiling, interpret):
    out = _gla_core(q, k, v, g, h0, seg, H, scale, tiling, interpret)
    return out, (q, k, v, g, h0, seg)


def _gla_core_bwd(H, scale, tiling, interpret, res, cotangents):
    q, k, v, g, h0, seg = res
    do, dht = cotangents
    gc, zc, decay = _prepare(g, seg, tiling.chunk_size)
    hs = chunk_states(k, v, gc, zc, decay, h0, seg, H=H, tiling=tiling, interpret=interpret)
    dq, dk, dg, dv, dh0 = backward(q, k, v, gc, zc, decay, hs, do.astype(v.dtype), dht.astype(F32), seg, H=H,
                                   scale=scale, tiling=tiling, interpret=interpret)
    dg = jnp.where(is_zero_gate(g), 0.0, dg.reshape(g.shape))  # at a zero gate: 0, the limit g -> -inf
    return dq, dk, dv, dg, dh0, None


_gla_core.defvjp(_gla_core_fwd, _gla_core_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "output_final_state", "tiling", "interpret", "dtype"))
def _chunk_gla(q, k, v, g, initial_state, segment_ids, *, scale, output_final_state, tiling, interpret, dtype):
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = tiling.chunk_size
    Kp, Vp = padded_width(K), padded_width(V)
    Tp = -(-T // C) * C
    dt = jnp.dtype(dtype)
    pad = lambda x, w: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, w - x.shape[-1])))
    # [B, T, H, W] -> [B, T, H·W] is free (contiguous): a head's [C, W] slab is then one (8, 128)-tiled block.
    flat = lambda x: x.reshape(B, Tp, -1)
    q_, k_, v_ = flat(pad(q.astype(dt), Kp)), flat(pad(k.astype(dt), Kp)), flat(pad(v.astype(dt), Vp))
    g_ = pad(g.astype(F32), Kp)  # zero gates on the padding: the state passes through unchanged
    if initial_state is None:
        h0 = jnp.zeros((B, H, Kp, Vp), F32)
    else:
        h0 = jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    seg = None
    if segment_ids is not None:  # padding continues the last document
        seg = document_codes(jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, Tp - T)), mode="edge"), C)
    o, ht = _gla_core(q_, k_, v_, g_, h0, seg, H, scale, tiling, interpret)
    o = o.reshape(B, Tp, H, Vp)[:, :T, :, :V].astype(jnp.result_type(q.dtype, k.dtype, v.dtype))
    return o, (ht[:, :, :K, :V] if output_final_state else None)


def chunk_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
              interpret=False, chunk_size=128, sub_chunk=16, generation="v5e"):
    """Chunkwise gated linear attention with Pallas Mosaic TPU kernels (forward and ``custom_vjp`` backward).

    Args:
      q, k: [B, T, H, K] queries and keys; g: [B, T, H, K] log forget gates (<= 0, float32 inside the kernels);
        v: [B, T, H, V]. float32, bfloat16 or float16 (float16 and float64 are computed in float32; the MXU's
        half-precision type is bfloat16). Matmuls take the inputs' dtype with float32 accumulation; gates,
        states, the diagonal sub-blocks and the dA products of the backward are float32.
      scale: query scale (default K ** -0.5).
      initial_state: [B, H, K, V] state before position 0 (belongs to the first document), or None.
      output_final_state: also return the state after the last position.
      segment_ids: [B, T] integer document ids (documents contiguous); the state restarts from zero at each
        document start.
      interpret: False: compile for the TPU. True: TPU interpret mode on the CPU with race detection and
        NaN-filled uninitialised memory; or a ``pltpu.InterpretParams``. Under a mesh of N CPU devices, set
        ``NPROC`` > N (e.g. 2N) before jax starts, or it can deadlock (``interpret_pool``; warned).
      chunk_size: chunk length; raised to a multiple of 128 (the lane width; the result does not depend on it),
        so the operator's default 64 runs with 128. 256 suits v6e's 256x256 MXU.
      sub_chunk: secondary chunk (a multiple of 16 dividing the chunk), see ``tiling.Tiling``.
      generation: TPU generation ("v4", "v5e", "v5p", "v6e") whose scoped VMEM limit the tiling must fit.

    Returns:
      (o [B, T, H, V] in the inputs' dtype, final_state [B, H, K, V] float32 or None). Differentiable in q, k, v,
      g and initial_state.
    """
    scale = check_kernel_inputs(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                                impl="mosaic_tpu", chunk_size=chunk_size)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if dtype != jnp.bfloat16:
        dtype = jnp.float32
    tiling = Tiling(chunk_size=max(LANE, -(-int(chunk_size) // LANE) * LANE), sub_chunk=sub_chunk,
                    generation=generation)
    tiling.validate()
    check_vmem(tiling, padded_width(q.shape[-1]), padded_width(v.shape[-1]), dtype,
               has_seg=segment_ids is not None)
    warn_if_cpu_pool_too_small(interpret)
    return _chunk_gla(q, k, v, g, initial_state, segment_ids, scale=float(scale),
                      output_final_state=bool(output_final_state), tiling=tiling,
                      interpret=interpret_params(interpret), dtype=jnp.dtype(dtype).name)
