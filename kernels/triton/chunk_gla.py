"""Public entry of the Pallas GLA kernels: ``chunk_gla`` (validation, padding, ``jax.custom_vjp``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gla_jax.ops.checks import check_kernel_inputs  # the operator's input contract (a jax-only leaf module)
from gla_jax.ops.chunk_math import chunk_relative, document_index

from .backward import backward
from .forward import forward
from .tiling import Tiling, padded_width

@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _gla_core(q, k, v, g, h0, rel, scale, tiling, interpret):
    o, ht, _ = forward(q, k, v, g, h0, rel, scale=scale, tiling=tiling, interpret=interpret)
    return o, ht


def _gla_core_fwd(q, k, v, g, h0, rel, scale, tiling, interpret):
    o, ht, a = forward(q, k, v, g, h0, rel, scale=scale, tiling=tiling, interpret=interpret)
    return (o, ht), (q, k, v, g, h0, rel, a)


def _gla_core_bwd(scale, tiling, interpret, res, cotangents):
    q, k, v, g, h0, rel, a = res
    do, dht = cotangents
    dq, dk, dv, dg, dh0 = backward(q, k, v, g, h0, rel, a, do, dht, scale=scale, tiling=tiling, interpret=interpret)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype), dh0.astype(h0.dtype),
            None)


_gla_core.defvjp(_gla_core_fwd, _gla_core_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "output_final_state", "tiling", "interpret", "matmul_dtype"))
def _chunk_gla(q, k, v, g, initial_state, segment_ids, *, scale, output_final_state, tiling, interpret,
               matmul_dtype):
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = tiling.chunk_size
    Kp, Vp = padded_width(K), padded_width(V)
    Tp = -(-T // C) * C
    dt = jnp.dtype(matmul_dtype)  # resolved by chunk_gla
    pad = lambda x, w: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, w - x.shape[-1])))
    q_, k_, g_ = pad(q.astype(dt), Kp), pad(k.astype(dt), Kp), pad(g.astype(jnp.float32), Kp)
    v_ = pad(v.astype(dt), Vp)
    if initial_state is None:
        h0 = jnp.zeros((B, H, Kp, Vp), jnp.float32)
    else:
        h0 = jnp.pad(initial_state.astype(jnp.float32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))
    rel = None
    if segment_ids is not None:  # padding continues the last document
        doc = jnp.pad(document_index(segment_ids), ((0, 0), (0, Tp - T)), mode="edge")
        rel = chunk_relative(doc, C)
    tiling = tiling.resolve(Kp, Vp)
    o, ht = _gla_core(q_, k_, v_, g_, h0, rel, scale, tiling, interpret)
    o = o[:, :T, :, :V].astype(jnp.result_type(q.dtype, k.dtype, v.dtype))
    return o, (ht[:, :, :K, :V] if output_final_state else None)


def chunk_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
              interpret=False, chunk_size=64, block_k=64, block_v=64, block_k_bwd=32, num_warps=None, num_stages=2,
              matmul_dtype=None):
    """Chunkwise gated linear attention with Pallas Triton kernels (forward and ``custom_vjp`` backward).

    Args:
      q, k: [B, T, H, K] queries and keys; g: [B, T, H, K] log forget gates (<= 0); v: [B, T, H, V].
        float32, bfloat16 or float16 (float64 is computed in float32). Matmuls take the inputs' dtype with
        float32 accumulation (float32 matmuls keep float32 accuracy: three TF32 products on the GPU, not one);
        gates, states and the diagonal sub-blocks are float32.
      scale: query scale (default K ** -0.5).
      initial_state: [B, H, K, V] state before position 0 (belongs to the first document), or None.
      output_final_state: also return the state after the last position.
      segment_ids: [B, T] integer document ids (documents contiguous); the state restarts from zero at each
        document start.
      interpret: run the kernels in Pallas interpret mode (CPU); otherwise they need a CUDA GPU.
      chunk_size, block_k, block_v, block_k_bwd, num_warps, num_stages: tiling (powers of two >= 16 for the
        sizes); any T, K and V are accepted (padded internally). num_warps defaults to 4 for half-precision
        matmuls and 8 for float32 ones (their split TF32 operands need twice the registers: with 4 warps the
        state-gradient kernel spills, see experiments/kernel_resources.py).
      matmul_dtype: operand dtype of the matmuls and of the stored chunk states (default: the inputs' dtype).
        ``jnp.float32`` with bfloat16 inputs trades speed for accuracy (every output and gradient then carries
        about the bfloat16 rounding of the result, ~1.5e-3, instead of ~2-2.5e-3).

    Returns:
      (o [B, T, H, V] in the inputs' dtype, final_state [B, H, K, V] float32 or None). Differentiable in q, k, v,
      g and initial_state.
    """
    scale = check_kernel_inputs(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                                impl="triton", chunk_size=chunk_size)
    if matmul_dtype is not None:
        try:
            ok = jnp.dtype(matmul_dtype) in (jnp.float32, jnp.bfloat16, jnp.float16)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"matmul_dtype: expected float32, bfloat16, float16 or None, got {matmul_dtype!r}")
    else:
        matmul_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
        if matmul_dtype == jnp.float64:  # Triton has no useful float64 matmul: compute in float32
            matmul_dtype = jnp.float32
    matmul_dtype = jnp.dtype(matmul_dtype).name
    if num_warps is None:
        num_warps = 8 if matmul_dtype == "float32" else 4
    tiling = Tiling(chunk_size=chunk_size, block_k=block_k, block_v=block_v, block_k_bwd=block_k_bwd,
                    num_warps=num_warps, num_stages=num_stages)
    tiling.validate()
    return _chunk_gla(q, k, v, g, initial_state, segment_ids, scale=float(scale),
                      output_final_state=bool(output_final_state), tiling=tiling, interpret=bool(interpret),
                      matmul_dtype=matmul_dtype)
