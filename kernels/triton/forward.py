"""Forward Pallas (Triton) kernels of chunkwise GLA, materialized variant.

All arrays here are already padded: T a multiple of the chunk size C, K and V powers of two >= 16. Layouts are
the operator's: q, k, g [B, T, H, K], v [B, T, H, V]; the kernels index them through BlockSpecs, no transposes.

Passes (docs/design.md §1, chunkwise form):
  1. ``chunk_cumsum``: gc and zc, the inclusive cumulative gates and zero-gate steps from each chunk start (float32,
     plain jnp, ``gla_jax.ops.chunk_math``).
  2. ``state_pass``: per (batch, head, K tile, V tile) a sequential loop over chunks that writes the state entering
     every chunk (``hs`` [B, NT, H, K, V]) and the final state.
  3. ``intra_chunk``: A [B, T, H, C], the causal intra-chunk attention matrix (scale included), one program per
     chunk, 16 rows (a sub-chunk I) per loop step: the off-diagonal part (columns before I) is one half-precision
     matmul relative to the gate at I's first row; the diagonal 16x16 sub-block is elementwise float32 in log
     space, a column at a time.
  4. ``output``: o = (scale q ⊙ e^b) S + A v per (chunk, V tile).

Zero gates (α = 0, g = −inf or <= ``gla_jax.ops.gates.ZERO_LOG_GATE``) never enter gc: they count as 0 there and
separately, exactly, in zc [B, T, H, K] float32 (multiples of −256 from the chunk start), and every exponent is
(gc_x − gc_y) + (zc_x − zc_y): unchanged between positions with no zero gate between them, <= −256 (a factor of
exactly 0) across one (docs/design.md §2). Kernels that only need exponents from the chunk start or to the chunk
end get them summed in advance (``one_sided``: gs = gc + zc, ge = (gc_C − gc) + (zc_C − zc), both exact in that
sense), so they load one gate array as before; only the pairwise kernels (intra-chunk, dq/dk) load both.

Packed documents are handled with ``rel`` [B, T] int32 (``gla_jax.ops.chunk_math.chunk_relative``): the number of
document starts from the chunk start up to and including each position. Inside a chunk two positions see each other
only when their ``rel`` agree, the incoming state reaches only positions with ``rel == 0``, and the state survives
the chunk only when the last position has ``rel == 0``.
"""

from __future__ import annotations


import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gla_jax.ops.chunk_math import SUB_CHUNK, chunk_cumsum  # shared pure-jnp pieces (a jax-only leaf module)

from .grids import per_chunk, per_chunk_v_tile, state_loop
from .tiling import Tiling, dot

F32 = jnp.float32


def one_sided(gc, zc, chunk_size: int):
    """(gs, ge) [B, T, H, K] float32: the exponents from the chunk start, gc + zc, and to the chunk end,
    (gc_C - gc) + (zc_C - zc) (gc_C: the chunk's last row). Each is the plain gate sum where no zero gate lies in
    between and <= -256 (e^x exactly 0) where one does."""
    B, T, H, K = gc.shape
    last = lambda x: jnp.repeat(x[:, chunk_size - 1::chunk_size], chunk_size, axis=1)
    return gc + zc, (last(gc) - gc) + (last(zc) - zc)


def _split(rest, has_seg):
    return (rest[0], rest[1:]) if has_seg else (None, rest)


# ----------------------------------------------------------------------------------------------------- kernels


def _state_kernel(k_ref, v_ref, ge_ref, gs_ref, h0_ref, *rest, C, NT, has_seg, dt):
    """One (b, h, K tile, V tile): walk the chunks, store the state entering each one, then the final state."""
    rel_ref, (hs_ref, ht_ref) = _split(rest, has_seg)

    def body(n, s):
        t0 = pl.multiple_of(n * C, C)
        hs_ref[n] = s.astype(hs_ref.dtype)
        kk = k_ref[pl.ds(t0, C), :].astype(F32) * jnp.exp(ge_ref[pl.ds(t0, C), :])  # exponents <= 0
        decay = jnp.exp(gs_ref[pl.ds(t0 + C - 1, 1), :])  # [1, BK]: the whole chunk
        if has_seg:
            rb = rel_ref[pl.ds(t0, C)]
            rl = rel_ref[pl.ds(t0 + C - 1, 1)]  # [1]
            kk = jnp.where((rb == rl)[:, None], kk, 0.0)  # only the chunk's last document reaches the next chunk
            decay = jnp.where((rl == 0)[None, :], decay, 0.0)
        s = s * decay.reshape(-1)[:, None] + dot(kk.astype(dt), v_ref[pl.ds(t0, C), :].astype(dt), trans_a=True)
        return s

    ht_ref[...] = lax.fori_loop(0, NT, body, h0_ref[...].astype(F32))


def _intra_kernel(q_ref, k_ref, g_ref, z_ref, *rest, C, NK, BK, scale, has_seg, dt):
    """One (b, h, chunk): A of the chunk, one sub-chunk I (16 rows of A) per loop step, zeros above the diagonal.

    Loops (``fori_loop``) rather than Python unrolling keep the compiled kernel small: a few thousand lines of PTX
    and seconds to compile instead of ~40k lines and minutes."""
    rel_ref, (a_ref,) = _split(rest, has_seg)
    c = SUB_CHUNK
    cols = jnp.arange(C)[None, :]
    rows = jnp.arange(c)[:, None]
    rows_all = jnp.arange(C)[:, None]

    def sub_chunk(i, carry):
        s0 = pl.multiple_of(i * c, c)
        rows_i = pl.ds(s0, c)
        a = jnp.zeros((c, C), F32)
        for kt in range(NK):
            ks = pl.ds(kt * BK, BK)
            g_i, z_i = g_ref[rows_i, ks], z_ref[rows_i, ks]
            # Off-diagonal: I against every column before it, one matmul relative to I's first-row gate r (the
            # columns before I have gates >= r, I's rows <= r: both exponents <= 0). Zero for the first sub-chunk.
            r, rz = g_ref[pl.ds(s0, 1), ks], z_ref[pl.ds(s0, 1), ks]
            q_i = q_ref[rows_i, ks].astype(F32)
            k_decayed = k_ref[:, ks].astype(F32) * jnp.exp(
                jnp.minimum((r - g_ref[:, ks]) + (rz - z_ref[:, ks]), 0.0))
            k_before = jnp.where(rows_all < s0, k_decayed, 0.0)
            a += dot((q_i * jnp.exp((g_i - r) + (z_i - rz))).astype(dt), k_before.astype(dt), trans_b=True)
            # Diagonal sub-block, elementwise in float32 log space, one column j at a time.

            def column(j, a):
                k_j = k_ref[pl.ds(s0 + j, 1), ks].astype(F32)
                gap = (g_i - g_ref[pl.ds(s0 + j, 1), ks]) + (z_i - z_ref[pl.ds(s0 + j, 1), ks])
                e = jnp.exp(jnp.minimum(gap, 0.0))  # rows >= j are kept: exponent <= 0
                col = jnp.sum(q_i * k_j * e, axis=1, keepdims=True)  # [c, 1]
                return jnp.where((cols == s0 + j) & (rows >= j), a + col, a)

            a = lax.fori_loop(0, c, column, a)
        if has_seg:
            a = jnp.where(rel_ref[rows_i][:, None] == rel_ref[...][None, :], a, 0.0)
        a_ref[rows_i, :] = a * scale
        return carry

    lax.fori_loop(0, C // c, sub_chunk, 0)


def _output_kernel(q_ref, gs_ref, v_ref, a_ref, hs_ref, *rest, NK, BK, scale, has_seg, dt):
    """One (b, h, chunk, V tile): o = A v + (scale q ⊙ e^b) S."""
    rel_ref, (o_ref,) = _split(rest, has_seg)
    o = dot(a_ref[...].astype(dt), v_ref[...].astype(dt))
    for kt in range(NK):
        ks = pl.ds(kt * BK, BK)
        qe = q_ref[:, ks].astype(F32) * (jnp.exp(gs_ref[:, ks]) * scale)
        if has_seg:
            qe = jnp.where((rel_ref[...] == 0)[:, None], qe, 0.0)
        o += dot(qe.astype(dt), hs_ref[ks, :].astype(dt))
    o_ref[...] = o.astype(o_ref.dtype)


# ----------------------------------------------------------------------------------------------------- launchers


def state_pass(k, v, gs, ge, h0, rel, *, tiling: Tiling, interpret: bool, state_dtype):
    """Chunk-start states hs [B, NT, H, K, V] (``state_dtype``) and the final state [B, H, K, V] float32; gs, ge
    from ``one_sided``."""
    return state_loop(_state_kernel, [k, v, ge, gs, h0], ["k", "v", "k", "k", "state"], rel=rel,
                      state_dtype=state_dtype, tiling=tiling, interpret=interpret, name="gla_state_fwd", dt=k.dtype)


def intra_chunk(q, k, gc, zc, rel, *, scale: float, tiling: Tiling, interpret: bool):
    """A [B, T, H, C] float32: A[t, j] = scale Σ_d q_td k_sd e^{b_td - b_sd} for s = chunk_start + j <= t (same
    document), else 0."""
    K, BK = q.shape[-1], tiling.block_k
    return per_chunk(_intra_kernel, [q, k, gc, zc], rel=rel, tiling=tiling, interpret=interpret,
                     name="gla_intra_fwd", NK=K // BK, BK=BK, scale=scale, dt=q.dtype)


def output(q, gs, v, a, hs, rel, *, scale: float, tiling: Tiling, interpret: bool):
    """o [B, T, H, V] in v's dtype from A, the chunk-start states and the queries."""
    K, BK = q.shape[-1], tiling.block_k
    return per_chunk_v_tile(_output_kernel, [q, gs, v, a, hs], ["full", "full", "v", "full", "state"], rel=rel,
                            out_dtype=v.dtype, tiling=tiling, interpret=interpret, name="gla_output_fwd",
                            NK=K // BK, BK=BK, scale=scale, dt=q.dtype)


def forward(q, k, v, g, h0, rel, *, scale: float, tiling: Tiling, interpret: bool):
    """Padded inputs -> (o [B, T, H, V], final state [B, H, K, V] float32, A [B, T, H, C] float32)."""
    gc, zc = chunk_cumsum(g, tiling.chunk_size)
    gs, ge = one_sided(gc, zc, tiling.chunk_size)
    hs, ht = state_pass(k, v, gs, ge, h0, rel, tiling=tiling, interpret=interpret, state_dtype=q.dtype)
    a = intra_chunk(q, k, gc, zc, rel, scale=scale, tiling=tiling, interpret=interpret)
    o = output(q, gs, v, a, hs, rel, scale=scale, tiling=tiling, interpret=interpret)
    return o, ht, a
