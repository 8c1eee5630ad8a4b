"""Backward Mosaic TPU kernel of chunkwise GLA: one fused reverse pass over the chunks.

Per (b, h) the chunks are walked last to first with dS, the gradient of the state leaving the current chunk, in a
float32 [K, V] VMEM scratch (initialised from the final state's cotangent). The states entering each chunk, S, come
from ``forward.chunk_states`` (recomputed, stored in the matmul dtype). For chunk n, with g the chunk-local
cumulative gate and A, dA the intra-chunk matrices (causal, same document, scale included):

    dA = scale (do vᵀ)                   A recomputed by ``blocks.intra_attention``
    dv = Aᵀ do + (k ⊙ e^{g_C - g}) dS
    dq = scale (do Sᵀ) ⊙ e^{g}  + Σ_{j<=i} dA_ij k_j e^{g_i - g_j}          (``blocks.gated_past``)
    dk = (v dSᵀ) ⊙ e^{g_C - g}  + Σ_{i>=j} dA_ij q_i e^{g_i - g_j}          (``blocks.gated_future``)
    dg = M (q ⊙ dq - k ⊙ dk) + [last document] edge,  0 at document starts
    dS <- diag(decay) dS + (scale q ⊙ e^{g})ᵀ do       (the gradient of the state leaving chunk n - 1)

dg is the per-chunk form of the reverse-cumulative-sum identity (docs/design.md §2; kernels/backward.py explains
it): M[t, s] = 1 for s >= t in the same document (one float32 MXU product), and
edge = Σ_t k_t ⊙ dk_state_t + e^{g_C} ⊙ Σ_v S ⊙ dS (Σ_v S_end ⊙ dS_end regrouped), the second term only when no
document starts in the chunk. Nothing is summed across chunks, so bfloat16 rounding does not accumulate with T.
The dA products and M are float32 operands: their terms cancel pairwise in dg (+X in dq's row, -X in dk's).
The Σ_v row comes out of an MXU product with a ones matrix ([8, V] x [K, V]ᵀ), which turns the [K, 1] column
into a [1, K] row without a lane-changing reshape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .blocks import F32, doc_masks, dot, gap, gated_future, gated_past, intra_attention, iota
from .forward import launch, launch_geometry
from .tiling import SUBLANE, Tiling


def _backward_kernel(q_ref, k_ref, g_ref, z_ref, v_ref, do_ref, hs_ref, decay_ref, dht_ref, *rest, NT, scale, c,
                     dt, has_seg):
    if has_seg:
        relc_ref, relr_ref, *rest = rest
    dq_ref, dk_ref, dg_ref, dv_ref, dh0_ref, ds_scr, a_scr, dq_scr, dk_scr = rest
    C = g_ref.shape[0]
    it = pl.program_id(2)

    @pl.when(it == 0)
    def _():
        ds_scr[...] = dht_ref[...]

    rows, cols = iota((C, C), 0), iota((C, C), 1)
    mask = cols <= rows  # [t, s]: s <= t
    later = cols >= rows  # [t, s]: s >= t
    if has_seg:
        same, first, last, start = doc_masks(relc_ref, relr_ref, C)
        mask, later = mask & same, later & same
    ds = ds_scr[...]
    g, z = g_ref[...], z_ref[...]
    eg = jnp.exp(g + z)
    e_out = jnp.exp(gap(g[C - 1:C, :], z[C - 1:C, :], g, z))  # e^{g_C - g} <= 1
    q = q_ref[...].astype(F32)
    k = k_ref[...].astype(F32)
    do = do_ref[...]
    v = v_ref[...]

    intra_attention(q_ref, k_ref, g_ref, z_ref, a_scr, c=c, dt=dt)
    a = jnp.where(mask, a_scr[...], 0.0) * scale
    w = jnp.where(mask, dot(do, v, dt=dt, trans_b=True), 0.0) * scale  # scale dA, [t, s]

    ke = k * e_out
    dq_state = dot(do, hs_ref[...], dt=dt, trans_b=True) * (eg * scale)
    dk_state = dot(v, ds, dt=dt, trans_b=True) * e_out
    if has_seg:
        ke = jnp.where(last, ke, 0.0)
        dq_state = jnp.where(first, dq_state, 0.0)  # only the first document saw the incoming state
        dk_state = jnp.where(last, dk_state, 0.0)  # only the last one leaves the chunk
    dv_ref[...] = (dot(a.T, do, dt=dt) + dot(ke, ds, dt=dt)).astype(dv_ref.dtype)

    gated_past(w, k_ref, g_ref, z_ref, dq_scr, c=c)
    gated_future(w.T, q_ref, g_ref, z_ref, dk_scr, c=c)
    dq = dq_scr[...] + dq_state
    dk = dk_scr[...] + dk_state
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)

    # dg by the per-chunk reverse-cumsum identity; edge = Σ_v S_end ⊙ dS_end as a [1, K] row.
    dg = dot(later.astype(F32), q * dq - k * dk)
    carried = hs_ref[...].astype(F32) * ds * decay_ref[...]  # [K, V]; decay is 0 when a document starts inside
    ones = jnp.ones((SUBLANE, carried.shape[1]), F32)
    edge = jnp.sum(k * dk_state, axis=0, keepdims=True) + dot(ones, carried, trans_b=True)[0:1, :]
    if has_seg:
        dg = dg + jnp.where(last, edge, 0.0)
        dg = jnp.where(start, 0.0, dg)  # a start's gate multiplies a dropped state
    else:
        dg = dg + edge
    dg_ref[...] = dg  # at zero gates chunk_gla sets it to 0 (the limit g -> -inf)

    qe = q * (eg * scale)
    if has_seg:
        qe = jnp.where(first, qe, 0.0)
    ds_scr[...] = ds * decay_ref[...] + dot(qe.T, do, dt=dt)

    @pl.when(it == NT - 1)
    def _():
        dh0_ref[...] = ds_scr[...]


def backward(q, k, v, gc, zc, decay, hs, do, dht, seg, *, H, scale: float, tiling: Tiling, interpret):
    """(dq, dk [B, T, H·K] in q's dtype, dg [B, T, H·K] float32, dv [B, T, H·V] in v's dtype, dh0 [B, H, K, V]
    float32). hs: chunk-start states [B, NT, H, K, V]; do: [B, T, H·V]; dht: [B, H, K, V] float32."""
    B, K, V, C, NT, sp = launch_geometry(q, v, H=H, tiling=tiling, reverse=True)
    return launch(
        functools.partial(_backward_kernel, NT=NT, scale=scale, c=tiling.sub_chunk, dt=q.dtype),
        (q, k, gc, zc, v, do, hs, decay, dht), seg, sp,
        in_specs=[sp["k"], sp["k"], sp["k"], sp["k"], sp["v"], sp["v"], sp["states"], sp["decay"], sp["state"]],
        grid=(B, H, NT),
        out_specs=[sp["k"], sp["k"], sp["k"], sp["v"], sp["state"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(gc.shape, F32), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((B, H, K, V), F32)],
        scratch_shapes=[pltpu.VMEM((K, V), F32), pltpu.VMEM((C, C), F32), pltpu.VMEM((C, K), F32),
                        pltpu.VMEM((C, K), F32)],
        interpret=interpret,
        name="gla_tpu_bwd",
    )
