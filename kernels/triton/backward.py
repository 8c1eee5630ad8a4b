"""Backward Pallas (Triton) kernels of chunkwise GLA.

Inputs are padded as in ``forward.py``. With b the chunk-local cumulative gate, S_n the state entering chunk n and
dS_n the gradient of the state leaving chunk n (both [K, V] per batch and head):

  1. ``state_pass`` (forward kernel) recomputes the chunk-start states (nothing float32 per chunk is stored).
  2. ``dstate_pass``: reverse loop over chunks, dS_{n-1} = diag(e^{b_C}) dS_n + (scale q ⊙ e^b)ᵀ do; writes dS_n
     for every chunk and the initial state's gradient.
  3. ``attn_grad``: dA = do vᵀ (causal, same document) per chunk.
  4. ``dv``: dv = Aᵀ do + (k ⊙ e^{b_C - b}) dS_n per (chunk, V tile).
  5. ``dqk``: per (chunk, K tile), one sub-chunk (16 rows) per loop step, the inter-chunk parts (do Sᵀ, v dSᵀ),
     the off-diagonal intra parts as matmuls relative to a sub-chunk reference gate, and the diagonal sub-block
     elementwise in float32, a column at a time; also the chunk's edge term of dg (step 6).
  6. dg (``gate_grad``, plain jnp) by the reverse-cumulative-sum identity applied per chunk. With x = q ⊙ dq − k ⊙ dk
     and dk_state = (v dSᵀ) ⊙ e^{b_C - b} (the part of dk through the state leaving the chunk),

       dg_t = Σ_{s >= t in the chunk, same document} x_s + [t in the chunk's last document] edge,
       edge = Σ_{s in the chunk} k_s ⊙ dk_state_s + e^{b_C} ⊙ Σ_v S ⊙ dS   (= Σ_v S_end ⊙ dS_end),

     the e^{b_C} term only when no document starts in the chunk, and dg = 0 at document starts (their gate
     multiplies a dropped state). This equals the global identity (reverse cumsum over the whole sequence plus
     Σ_v S_T ⊙ dS_T) but sums nothing across chunks, so the rounding of bfloat16 operands does not accumulate with
     T; edge is summed from float32 terms in the kernel, not from the bfloat16-stored end states (which would put
     bfloat16 dg near 4e-3). At a zero gate (α = 0) dg is set to 0, the limit g → −∞ (docs/design.md §2); every
     exponent carries the zero-gate count zc as in ``forward.py``.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gla_jax.ops.chunk_math import SUB_CHUNK, chunk_cumsum, cumsum_rows  # shared pure-jnp pieces
from gla_jax.ops.gates import is_zero_gate  # a jax-only leaf module

from .forward import F32, _split, one_sided, state_pass
from .grids import per_chunk, per_chunk_v_tile, state_loop
from .tiling import SQUEEZED as SQ, Tiling, dot, launch

# ----------------------------------------------------------------------------------------------------- kernels


def _dstate_kernel(q_ref, gs_ref, do_ref, dht_ref, *rest, C, NT, scale, has_seg, dt):
    """One (b, h, K tile, V tile): walk the chunks backwards; store the gradient of each chunk's end state."""
    rel_ref, (dhs_ref, dh0_ref) = _split(rest, has_seg)

    def body(it, ds):
        n = NT - 1 - it
        t0 = pl.multiple_of(n * C, C)
        dhs_ref[n] = ds.astype(dhs_ref.dtype)
        gb = gs_ref[pl.ds(t0, C), :]  # exponents from the chunk start (forward.one_sided)
        gl = gs_ref[pl.ds(t0 + C - 1, 1), :]
        qe = q_ref[pl.ds(t0, C), :].astype(F32) * (jnp.exp(gb) * scale)
        decay = jnp.exp(gl)
        if has_seg:
            rb = rel_ref[pl.ds(t0, C)]
            rl = rel_ref[pl.ds(t0 + C - 1, 1)]
            qe = jnp.where((rb == 0)[:, None], qe, 0.0)  # only the first document saw the incoming state
            decay = jnp.where((rl == 0)[None, :], decay, 0.0)
        return ds * decay.reshape(-1)[:, None] + dot(qe.astype(dt), do_ref[pl.ds(t0, C), :].astype(dt),
                                                     trans_a=True)

    dh0_ref[...] = lax.fori_loop(0, NT, body, dht_ref[...].astype(F32))


def _attn_grad_kernel(do_ref, v_ref, *rest, C, NV, BV, has_seg, dt):
    """One (b, h, chunk): dA = do vᵀ, masked to the causal same-document pairs."""
    rel_ref, (da_ref,) = _split(rest, has_seg)
    da = jnp.zeros((C, C), F32)
    for vt in range(NV):
        vs = pl.ds(vt * BV, BV)
        da += dot(do_ref[:, vs].astype(dt), v_ref[:, vs].astype(dt), trans_b=True)
    rows = jnp.arange(C)
    mask = rows[:, None] >= rows[None, :]
    if has_seg:
        rel = rel_ref[...]
        mask = mask & (rel[:, None] == rel[None, :])
    da_ref[...] = jnp.where(mask, da, 0.0)


def _dv_kernel(a_ref, do_ref, k_ref, ge_ref, dhs_ref, *rest, C, NK, BK, has_seg, dt):
    """One (b, h, chunk, V tile): dv = Aᵀ do + (k ⊙ e^{b_C - b}) dS."""
    rel_ref, (dv_ref,) = _split(rest, has_seg)
    dv = dot(a_ref[...].astype(dt), do_ref[...].astype(dt), trans_a=True)
    for kt in range(NK):
        ks = pl.ds(kt * BK, BK)
        ke = k_ref[:, ks].astype(F32) * jnp.exp(ge_ref[:, ks])  # exponents to the chunk end (forward.one_sided)
        if has_seg:
            rel = rel_ref[...]
            ke = jnp.where((rel == rel_ref[pl.ds(C - 1, 1)])[:, None], ke, 0.0)
        dv += dot(ke.astype(dt), dhs_ref[ks, :].astype(dt))
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dqk_kernel(q_ref, k_ref, g_ref, z_ref, do_ref, v_ref, hs_ref, dhs_ref, da_ref, *rest, C, NV, BV, scale,
                has_seg, dt):
    """One (b, h, chunk, K tile): dq and dk of the chunk, one sub-chunk I (16 rows) per loop step, and the chunk's
    ``edge`` term of dg: Σ_t k_t ⊙ dk_state_t + e^{b_C} ⊙ Σ_v S ⊙ dS (Σ_v S_end ⊙ dS_end, regrouped so that no
    bfloat16-rounded end state enters it)."""
    rel_ref, (dq_ref, dk_ref, edge_ref) = _split(rest, has_seg)
    c = SUB_CHUNK
    rows = jnp.arange(C)[:, None]
    sub = jnp.arange(c)[:, None]
    g_last, z_last = g_ref[pl.ds(C - 1, 1), :], z_ref[pl.ds(C - 1, 1), :]
    tf32 = dt != F32
    rel_last = rel_ref[pl.ds(C - 1, 1)] if has_seg else None
    carried = jnp.zeros((hs_ref.shape[0],), F32)  # Σ_v S ⊙ dS: the incoming state's share of the leaving one
    for vt in range(NV):
        vs = pl.ds(vt * BV, BV)
        carried += jnp.sum(hs_ref[:, vs].astype(F32) * dhs_ref[:, vs].astype(F32), axis=1)
    carried = carried[None, :] * jnp.exp(g_last + z_last)
    if has_seg:
        carried = jnp.where(rel_last[:, None] == 0, carried, 0.0)  # it survives only a chunk with no start

    def sub_chunk(i, edge):
        s0 = pl.multiple_of(i * c, c)
        rows_i = pl.ds(s0, c)
        g_i, z_i = g_ref[rows_i, :], z_ref[rows_i, :]
        # Inter-chunk parts: do Sᵀ for dq (S entering the chunk), v dSᵀ for dk (dS of the state leaving it).
        def v_tile(vt, acc):
            vs = pl.ds(pl.multiple_of(vt * BV, BV), BV)
            return (acc[0] + dot(do_ref[rows_i, vs].astype(dt), hs_ref[:, vs].astype(dt), trans_b=True),
                    acc[1] + dot(v_ref[rows_i, vs].astype(dt), dhs_ref[:, vs].astype(dt), trans_b=True))

        dq_i, dk_state = lax.fori_loop(0, NV, v_tile, (jnp.zeros_like(g_i), jnp.zeros_like(g_i)))
        dq_i = dq_i * (jnp.exp(g_i + z_i) * scale)
        dk_state = dk_state * jnp.exp((g_last - g_i) + (z_last - z_i))
        if has_seg:
            rel_i = rel_ref[rows_i]
            dq_i = jnp.where((rel_i == 0)[:, None], dq_i, 0.0)  # only the first document saw the incoming state
            dk_state = jnp.where((rel_i == rel_last)[:, None], dk_state, 0.0)  # only the last one leaves the chunk
        # Off-diagonal intra-chunk parts (dA already holds the causal / same-document mask), relative to I's first
        # and last row gates; zero for the first / last sub-chunk. float32 operands (TF32 on the GPU when ``dt`` is
        # half precision): these terms cancel pairwise in dg (+X in a row of dq, -X in a row of dk), and bfloat16
        # rounding of either side would leave ~3e-3 of dg's error; they are ~1/8 of the kernel's flops.
        g_all, z_all = g_ref[...], z_ref[...]
        r, rz = g_ref[pl.ds(s0, 1), :], z_ref[pl.ds(s0, 1), :]  # columns before I have gates >= r
        k_before = jnp.where(rows < s0, k_ref[...].astype(F32)
                             * jnp.exp(jnp.minimum((r - g_all) + (rz - z_all), 0.0)), 0.0)
        dq_i += (jnp.exp((g_i - r) + (z_i - rz)) * scale) * dot(da_ref[rows_i, :], k_before, tf32=tf32)
        r2, r2z = g_ref[pl.ds(s0 + c - 1, 1), :], z_ref[pl.ds(s0 + c - 1, 1), :]  # rows after I have gates <= r2
        q_after = jnp.where(rows >= s0 + c, q_ref[...].astype(F32)
                            * jnp.exp(jnp.minimum((g_all - r2) + (z_all - r2z), 0.0)), 0.0)
        dk_i = (jnp.exp((r2 - g_i) + (r2z - z_i)) * scale) * dot(da_ref[:, rows_i], q_after, trans_a=True,
                                                                   tf32=tf32)
        # Diagonal sub-block, elementwise in float32 log space, one column j of dA at a time:
        # dq_t += dA_tj k_j e^{b_t - b_j} (t >= j), dk_j += Σ_t dA_tj q_t e^{b_t - b_j}.
        q_i = q_ref[rows_i, :].astype(F32)

        def column(j, acc):
            dq_i, dk_i = acc
            da_j = da_ref[rows_i, pl.ds(s0 + j, 1)] * scale  # [c, 1]; zero for t < j
            gap = (g_i - g_ref[pl.ds(s0 + j, 1), :]) + (z_i - z_ref[pl.ds(s0 + j, 1), :])
            w = da_j * jnp.exp(jnp.minimum(gap, 0.0))
            dq_i += w * k_ref[pl.ds(s0 + j, 1), :].astype(F32)
            dk_i += jnp.where(sub == j, jnp.sum(w * q_i, axis=0, keepdims=True), 0.0)
            return dq_i, dk_i

        dq_i, dk_i = lax.fori_loop(0, c, column, (dq_i, dk_i))
        dq_ref[rows_i, :] = dq_i
        dk_ref[rows_i, :] = dk_i + dk_state
        return edge + jnp.sum(k_ref[rows_i, :].astype(F32) * dk_state, axis=0, keepdims=True)

    edge_ref[...] = lax.fori_loop(0, C // c, sub_chunk, carried).reshape(-1)


# ----------------------------------------------------------------------------------------------------- launchers


def dstate_pass(q, gs, do, dht, rel, *, scale: float, tiling: Tiling, interpret: bool, state_dtype):
    """Gradients of each chunk's end state dhs [B, NT, H, K, V] (``state_dtype``) and of the initial state
    [B, H, K, V] float32."""
    return state_loop(_dstate_kernel, [q, gs, do, dht], ["k", "k", "v", "state"], rel=rel, state_dtype=state_dtype,
                      tiling=tiling, interpret=interpret, name="gla_state_bwd", scale=scale, dt=q.dtype)


def attn_grad(do, v, rel, *, tiling: Tiling, interpret: bool):
    """dA [B, T, H, C] float32 (causal, same document)."""
    V, BV = v.shape[-1], tiling.block_v
    return per_chunk(_attn_grad_kernel, [do, v], rel=rel, tiling=tiling, interpret=interpret, name="gla_attn_bwd",
                     NV=V // BV, BV=BV, dt=v.dtype)


def value_grad(a, do, k, ge, dhs, rel, *, tiling: Tiling, interpret: bool):
    """dv [B, T, H, V] float32."""
    K, BK = k.shape[-1], tiling.block_k
    return per_chunk_v_tile(_dv_kernel, [a, do, k, ge, dhs], ["full", "v", "full", "full", "state"], rel=rel,
                            out_dtype=F32, tiling=tiling, interpret=interpret, name="gla_dv_bwd",
                            C=tiling.chunk_size, NK=K // BK, BK=BK, dt=k.dtype)


def query_key_grad(q, k, gc, zc, do, v, hs, dhs, da, rel, *, scale: float, tiling: Tiling, interpret: bool):
    """(dq, dk) [B, T, H, K] float32 and the per-chunk edge term of dg [B, NT, H, K] float32."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, BK, BV = tiling.chunk_size, tiling.block_k_bwd, tiling.block_v
    kmap = lambda b, h, n, kt: (b, n, h, kt)
    fmap = lambda b, h, n, kt: (b, n, h, 0)
    smap = lambda b, h, n, kt: (b, n, h, kt, 0)
    in_specs = [
        *[pl.BlockSpec((SQ, C, SQ, BK), kmap)] * 4,  # q, k, gc, zc
        *[pl.BlockSpec((SQ, C, SQ, V), fmap)] * 2,  # do, v
        *[pl.BlockSpec((SQ, SQ, SQ, BK, V), smap)] * 2,  # hs, dhs
        pl.BlockSpec((SQ, C, SQ, C), fmap),  # da
    ]
    return launch(
        _dqk_kernel, [q, k, gc, zc, do, v, hs, dhs, da], in_specs, rel=rel,
        rel_spec=pl.BlockSpec((SQ, C), lambda b, h, n, kt: (b, n)),
        grid=(B, H, T // C, K // BK),
        out_specs=[pl.BlockSpec((SQ, C, SQ, BK), kmap)] * 2 + [pl.BlockSpec((SQ, SQ, SQ, BK), kmap)],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, K), F32)] * 2 + [jax.ShapeDtypeStruct((B, T // C, H, K), F32)],
        tiling=tiling, interpret=interpret, name="gla_dqk_bwd",
        C=C, NV=V // BV, BV=BV, scale=scale, dt=q.dtype,
    )


def gate_grad(q, k, dq, dk, edge, rel, chunk_size: int):
    """dg [B, T, H, K] float32 by the reverse-cumulative-sum identity applied per chunk (module docstring, step 6).

    q, k: [B, T, H, K]; dq, dk: their float32 gradients; edge: [B, NT, H, K] float32, Σ_v S_end ⊙ dS_end of each
    chunk (``query_key_grad``); rel: [B, T] int32 document starts from each chunk start, or None."""
    B, T, H, K = q.shape
    C = chunk_size
    NT = T // C
    w = (q.astype(F32) * dq - k.astype(F32) * dk).reshape(B, NT, C, H * K)  # rows are axis -2
    term = edge[:, :, None]  # [B, NT, 1, H, K]
    if rel is None:
        return (cumsum_rows(w, "reverse").reshape(B, NT, C, H, K) + term).reshape(B, T, H, K)
    r = rel.reshape(B, NT, C)
    same = r[:, :, :, None] == r[:, :, None, :]  # [B, NT, t, s]
    dg = cumsum_rows(w, "reverse", same).reshape(B, NT, C, H, K)
    dg += jnp.where((r == r[:, :, -1:])[..., None, None], term, 0.0)  # the state leaving carries the last document
    start = r != jnp.pad(r[:, :, :-1], ((0, 0), (0, 0), (1, 0)))  # a document start: its gate multiplies a dropped
    return jnp.where(start[..., None, None], 0.0, dg).reshape(B, T, H, K)  # state


def backward(q, k, v, g, h0, rel, a, do, dht, *, scale: float, tiling: Tiling, interpret: bool):
    """Padded inputs and cotangents (do, dht) -> (dq, dk, dv, dg, dh0), all float32."""
    gc, zc = chunk_cumsum(g, tiling.chunk_size)
    gs, ge = one_sided(gc, zc, tiling.chunk_size)
    do = do.astype(q.dtype)
    dht = dht.astype(F32)
    hs, _ = state_pass(k, v, gs, ge, h0, rel, tiling=tiling, interpret=interpret, state_dtype=q.dtype)
    dhs, dh0 = dstate_pass(q, gs, do, dht, rel, scale=scale, tiling=tiling, interpret=interpret,
                           state_dtype=q.dtype)
    da = attn_grad(do, v, rel, tiling=tiling, interpret=interpret)
    dv = value_grad(a, do, k, ge, dhs, rel, tiling=tiling, interpret=interpret)
    dq, dk, edge = query_key_grad(q, k, gc, zc, do, v, hs, dhs, da, rel, scale=scale, tiling=tiling,
                                  interpret=interpret)
    dg = gate_grad(q, k, dq, dk, edge, rel, tiling.chunk_size)
    dg = jnp.where(is_zero_gate(g), 0.0, dg)  # at a zero gate: 0, the limit g -> -inf
    return dq, dk, dv, dg, dh0
