"""Forward Pallas (Triton) kernels of chunkwise GLA, materialized variant.

All arrays here are already padded: T a multiple of the chunk size C, K and V powers of two >= 16. Layouts are
the operator's: q, k, g [B, T, H, K], v [B, T, H, V]; the kernels index them through BlockSpecs, no transposes.

Passes (DESIGN.md §1, chunkwise form):
  1. ``chunk_cumsum``: b, the inclusive cumulative gate from each chunk start (float32, plain jnp).
  2. ``state_pass``: per (batch, head, K tile, V tile) a sequential loop over chunks that writes the state entering
     every chunk (``hs`` [B, NT, H, K, V]) and the final state.
  3. ``intra_chunk``: A [B, T, H, C], the causal intra-chunk attention matrix (scale included), one program per
     chunk, 16 rows (a sub-chunk I) at a time: the off-diagonal part (columns before I) is one half-precision
     matmul relative to the gate at I's first row; the diagonal 16x16 sub-block is elementwise float32 in log
     space.
  4. ``output``: o = (scale q ⊙ e^b) S + A v per (chunk, V tile).

Packed documents are handled with ``rel`` [B, T] int32: the number of document starts from the chunk start up
to and including each position. Inside a chunk two positions see each other only when their ``rel`` agree, the
incoming state reaches only positions with ``rel == 0``, and the state survives the chunk only when the last
position has ``rel == 0``.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .tiling import SQUEEZED as SQ, SUB_CHUNK, Tiling, dot, launch

F32 = jnp.float32


def chunk_cumsum(g, chunk_size: int):
    """[B, T, H, K] -> float32 inclusive cumulative sum of g restarted at every chunk start."""
    B, T, H, K = g.shape
    gc = jnp.cumsum(g.astype(F32).reshape(B, T // chunk_size, chunk_size, H, K), axis=2)
    return gc.reshape(B, T, H, K)


def chunk_rel(segment_ids, chunk_size: int):
    """[B, T] int32: document starts counted from each chunk start up to and including t (0 = the chunk's first
    document; position 0 of the sequence is never a start)."""
    B, T = segment_ids.shape
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    starts = (segment_ids != prev).astype(jnp.int32)
    return jnp.cumsum(starts.reshape(B, T // chunk_size, chunk_size), axis=2).reshape(B, T)


def _split(rest, has_seg):
    return (rest[0], rest[1:]) if has_seg else (None, rest)


# ----------------------------------------------------------------------------------------------------- kernels


def _state_kernel(k_ref, v_ref, g_ref, h0_ref, *rest, C, NT, has_seg, dt):
    """One (b, h, K tile, V tile): walk the chunks, store the state entering each one, then the final state."""
    rel_ref, (hs_ref, ht_ref) = _split(rest, has_seg)

    def body(n, s):
        t0 = pl.multiple_of(n * C, C)
        hs_ref[n] = s.astype(hs_ref.dtype)
        gb = g_ref[pl.ds(t0, C), :]
        gl = g_ref[pl.ds(t0 + C - 1, 1), :]  # [1, BK] gate sum over the whole chunk
        kk = k_ref[pl.ds(t0, C), :].astype(F32) * jnp.exp(gl - gb)  # exponents <= 0
        decay = jnp.exp(gl)
        if has_seg:
            rb = rel_ref[pl.ds(t0, C)]
            rl = rel_ref[pl.ds(t0 + C - 1, 1)]  # [1]
            kk = jnp.where((rb == rl)[:, None], kk, 0.0)  # only the chunk's last document reaches the next chunk
            decay = jnp.where((rl == 0)[None, :], decay, 0.0)
        s = s * decay.reshape(-1)[:, None] + dot(kk.astype(dt), v_ref[pl.ds(t0, C), :].astype(dt), trans_a=True)
        return s

    ht_ref[...] = lax.fori_loop(0, NT, body, h0_ref[...].astype(F32))


def _intra_kernel(q_ref, k_ref, g_ref, *rest, C, NK, BK, BKD, scale, has_seg, dt):
    """One (b, h, chunk): A of the chunk, 16 rows (one sub-chunk I) at a time, zeros above the diagonal."""
    rel_ref, (a_ref,) = _split(rest, has_seg)
    c = SUB_CHUNK
    NC = C // c
    cols = jnp.arange(C)
    a_off = [jnp.zeros((c, C), F32) for _ in range(NC)]
    a_diag = [jnp.zeros((c, c), F32) for _ in range(NC)]
    for kt in range(NK):
        ks = pl.ds(kt * BK, BK)
        k_all = k_ref[:, ks].astype(F32)
        g_all = g_ref[:, ks]
        for i in range(1, NC):  # off-diagonal: I against the sub-chunks before it, one matmul
            s0 = i * c
            r = g_ref[pl.ds(s0, 1), ks]  # [1, BK] reference gate: I's first row
            q_i = q_ref[pl.ds(s0, c), ks].astype(F32) * jnp.exp(g_ref[pl.ds(s0, c), ks] - r)  # exponents <= 0
            k_before = jnp.where((cols < s0)[:, None], k_all * jnp.exp(jnp.minimum(r - g_all, 0.0)), 0.0)
            a_off[i] += dot(q_i.astype(dt), k_before.astype(dt), trans_b=True)
        for i in range(NC):  # diagonal sub-blocks, elementwise in float32 log space
            for kd in range(BK // BKD):
                ds = pl.ds(kt * BK + kd * BKD, BKD)
                gd = g_ref[pl.ds(i * c, c), ds]
                e = jnp.exp(jnp.minimum(gd[:, None, :] - gd[None, :, :], 0.0))  # [i, j, d]; j > i masked below
                qd = q_ref[pl.ds(i * c, c), ds].astype(F32)
                kd_ = k_ref[pl.ds(i * c, c), ds].astype(F32)
                a_diag[i] += jnp.sum(qd[:, None, :] * kd_[None, :, :] * e, axis=2)
    rows = jnp.arange(c)
    causal = rows[:, None] >= rows[None, :]
    if has_seg:
        rel = rel_ref[...]
    for i in range(NC):
        s0 = i * c
        a_d = jnp.where(causal, a_diag[i], 0.0)
        a_o = a_off[i]
        if has_seg:
            r_i = rel_ref[pl.ds(s0, c)]
            a_o = jnp.where(r_i[:, None] == rel[None, :], a_o, 0.0)
            a_d = jnp.where(r_i[:, None] == r_i[None, :], a_d, 0.0)
        # Two disjoint stores: everything but I's own columns, then the diagonal block.
        outside = jnp.broadcast_to(((cols < s0) | (cols >= s0 + c))[None, :], (c, C))
        plgpu.store(a_ref.at[pl.ds(s0, c), :], a_o * scale, mask=outside)
        a_ref[pl.ds(s0, c), pl.ds(s0, c)] = a_d * scale


def _output_kernel(q_ref, g_ref, v_ref, a_ref, hs_ref, *rest, NK, BK, scale, has_seg, dt):
    """One (b, h, chunk, V tile): o = A v + (scale q ⊙ e^b) S."""
    rel_ref, (o_ref,) = _split(rest, has_seg)
    o = dot(a_ref[...].astype(dt), v_ref[...].astype(dt))
    for kt in range(NK):
        ks = pl.ds(kt * BK, BK)
        qe = q_ref[:, ks].astype(F32) * (jnp.exp(g_ref[:, ks]) * scale)
        if has_seg:
            qe = jnp.where((rel_ref[...] == 0)[:, None], qe, 0.0)
        o += dot(qe.astype(dt), hs_ref[ks, :].astype(dt))
    o_ref[...] = o.astype(o_ref.dtype)


# ----------------------------------------------------------------------------------------------------- launchers


def state_pass(k, v, gc, h0, rel, *, tiling: Tiling, interpret: bool, state_dtype):
    """Chunk-start states hs [B, NT, H, K, V] (``state_dtype``) and the final state [B, H, K, V] float32."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    C, BK, BV = tiling.chunk_size, tiling.block_k, tiling.block_v
    NT = T // C
    kmap = lambda b, h, i, j: (b, 0, h, i)
    smap = lambda b, h, i, j: (b, h, i, j)
    in_specs = [
        pl.BlockSpec((SQ, T, SQ, BK), kmap),
        pl.BlockSpec((SQ, T, SQ, BV), lambda b, h, i, j: (b, 0, h, j)),
        pl.BlockSpec((SQ, T, SQ, BK), kmap),
        pl.BlockSpec((SQ, SQ, BK, BV), smap),
    ]
    return launch(
        _state_kernel, [k, v, gc, h0], in_specs, rel=rel,
        rel_spec=pl.BlockSpec((SQ, T), lambda b, h, i, j: (b, 0)),
        grid=(B, H, K // BK, V // BV),
        out_specs=[pl.BlockSpec((SQ, NT, SQ, BK, BV), lambda b, h, i, j: (b, 0, h, i, j)),
                   pl.BlockSpec((SQ, SQ, BK, BV), smap)],
        out_shape=[jax.ShapeDtypeStruct((B, NT, H, K, V), state_dtype), jax.ShapeDtypeStruct((B, H, K, V), F32)],
        tiling=tiling, interpret=interpret, name="gla_state_fwd",
        C=C, NT=NT, dt=k.dtype,
    )


def intra_chunk(q, k, gc, rel, *, scale: float, tiling: Tiling, interpret: bool):
    """A [B, T, H, C] float32: A[t, j] = scale Σ_d q_td k_sd e^{b_td - b_sd} for s = chunk_start + j <= t (same
    document), else 0."""
    B, T, H, K = q.shape
    C, BK = tiling.chunk_size, tiling.block_k
    cmap = lambda b, h, n: (b, n, h, 0)
    return launch(
        _intra_kernel, [q, k, gc], [pl.BlockSpec((SQ, C, SQ, K), cmap)] * 3, rel=rel,
        rel_spec=pl.BlockSpec((SQ, C), lambda b, h, n: (b, n)),
        grid=(B, H, T // C),
        out_specs=pl.BlockSpec((SQ, C, SQ, C), cmap),
        out_shape=jax.ShapeDtypeStruct((B, T, H, C), F32),
        tiling=tiling, interpret=interpret, name="gla_intra_fwd",
        C=C, NK=K // BK, BK=BK, BKD=min(tiling.block_k_intra, BK), scale=scale, dt=q.dtype,
    )


def output(q, gc, v, a, hs, rel, *, scale: float, tiling: Tiling, interpret: bool):
    """o [B, T, H, V] in v's dtype from A, the chunk-start states and the queries."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, BK, BV = tiling.chunk_size, tiling.block_k, tiling.block_v
    cmap = lambda b, h, n, j: (b, n, h, 0)
    vmap = lambda b, h, n, j: (b, n, h, j)
    in_specs = [
        pl.BlockSpec((SQ, C, SQ, K), cmap),
        pl.BlockSpec((SQ, C, SQ, K), cmap),
        pl.BlockSpec((SQ, C, SQ, BV), vmap),
        pl.BlockSpec((SQ, C, SQ, C), cmap),
        pl.BlockSpec((SQ, SQ, SQ, K, BV), lambda b, h, n, j: (b, n, h, 0, j)),
    ]
    return launch(
        _output_kernel, [q, gc, v, a, hs], in_specs, rel=rel,
        rel_spec=pl.BlockSpec((SQ, C), lambda b, h, n, j: (b, n)),
        grid=(B, H, T // C, V // BV),
        out_specs=pl.BlockSpec((SQ, C, SQ, BV), vmap),
        out_shape=jax.ShapeDtypeStruct((B, T, H, V), v.dtype),
        tiling=tiling, interpret=interpret, name="gla_output_fwd",
        NK=K // BK, BK=BK, scale=scale, dt=q.dtype,
    )


def forward(q, k, v, g, h0, rel, *, scale: float, tiling: Tiling, interpret: bool):
    """Padded inputs -> (o [B, T, H, V], final state [B, H, K, V] float32, A [B, T, H, C] float32)."""
    gc = chunk_cumsum(g, tiling.chunk_size)
    hs, ht = state_pass(k, v, gc, h0, rel, tiling=tiling, interpret=interpret, state_dtype=q.dtype)
    a = intra_chunk(q, k, gc, rel, scale=scale, tiling=tiling, interpret=interpret)
    o = output(q, gc, v, a, hs, rel, scale=scale, tiling=tiling, interpret=interpret)
    return o, ht, a
