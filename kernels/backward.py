"""Backward Pallas (Triton) kernels of chunkwise GLA.

Inputs are padded as in ``forward.py``. With b the chunk-local cumulative gate, S_n the state entering chunk n and
dS_n the gradient of the state leaving chunk n (both [K, V] per batch and head):

  1. ``state_pass`` (forward kernel) recomputes the chunk-start states (nothing float32 per chunk is stored).
  2. ``dstate_pass``: reverse loop over chunks, dS_{n-1} = diag(e^{b_C}) dS_n + (scale q ⊙ e^b)ᵀ do; writes dS_n
     for every chunk and the initial state's gradient.
  3. ``attn_grad``: dA = do vᵀ (causal, same document) per chunk.
  4. ``dv``: dv = Aᵀ do + (k ⊙ e^{b_C - b}) dS_n per (chunk, V tile).
  5. ``dqk``: per (chunk, K tile), 16 rows (a sub-chunk) at a time, the inter-chunk parts (do Sᵀ, v dSᵀ), the
     off-diagonal intra parts as half-precision matmuls relative to a sub-chunk reference gate, and the diagonal
     sub-block elementwise in float32.
  6. dg, in the same kernel, by the reverse-cumulative-sum identity applied per chunk: with x = q ⊙ dq − k ⊙ dk_intra
     and y = k ⊙ dk_state (dk_state = (v dSᵀ) ⊙ e^{b_C - b}, the part through the state leaving the chunk),

       dg_t = Σ_{s >= t in the chunk, same document} x_s + Σ_{s < t in the chunk} y_s + e^{b_C} ⊙ Σ_v S ⊙ dS,

     the last term only when no document starts in the chunk, and dg = 0 at document starts (their gate multiplies
     a dropped state). This equals the global identity (reverse cumsum over the whole sequence plus Σ_v S_T ⊙ dS_T)
     but sums nothing across chunks, so the rounding of bfloat16 operands does not accumulate with T.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .forward import F32, _split, chunk_cumsum, state_pass
from .tiling import SQUEEZED as SQ, SUB_CHUNK, Tiling, dot, launch

# ----------------------------------------------------------------------------------------------------- kernels


def _dstate_kernel(q_ref, g_ref, do_ref, dht_ref, *rest, C, NT, scale, has_seg, dt):
    """One (b, h, K tile, V tile): walk the chunks backwards; store the gradient of each chunk's end state."""
    rel_ref, (dhs_ref, dh0_ref) = _split(rest, has_seg)

    def body(it, ds):
        n = NT - 1 - it
        t0 = pl.multiple_of(n * C, C)
        dhs_ref[n] = ds.astype(dhs_ref.dtype)
        gb = g_ref[pl.ds(t0, C), :]
        gl = g_ref[pl.ds(t0 + C - 1, 1), :]
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


def _dv_kernel(a_ref, do_ref, k_ref, g_ref, dhs_ref, *rest, C, NK, BK, has_seg, dt):
    """One (b, h, chunk, V tile): dv = Aᵀ do + (k ⊙ e^{b_C - b}) dS."""
    rel_ref, (dv_ref,) = _split(rest, has_seg)
    dv = dot(a_ref[...].astype(dt), do_ref[...].astype(dt), trans_a=True)
    for kt in range(NK):
        ks = pl.ds(kt * BK, BK)
        ke = k_ref[:, ks].astype(F32) * jnp.exp(g_ref[pl.ds(C - 1, 1), ks] - g_ref[:, ks])
        if has_seg:
            rel = rel_ref[...]
            ke = jnp.where((rel == rel_ref[pl.ds(C - 1, 1)])[:, None], ke, 0.0)
        dv += dot(ke.astype(dt), dhs_ref[ks, :].astype(dt))
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dqk_kernel(q_ref, k_ref, g_ref, do_ref, v_ref, hs_ref, dhs_ref, da_ref, *rest, C, NV, BV, scale, has_seg,
                dt):
    """One (b, h, chunk, K tile): dq, dk and dg of the chunk, built 16 rows (one sub-chunk I) at a time.

    dg uses the chunk-local identity (module docstring, step 6), so nothing is summed across chunks."""
    rel_ref, (dq_ref, dk_ref, dg_ref) = _split(rest, has_seg)
    c = SUB_CHUNK
    NC = C // c
    BK = q_ref.shape[-1]
    # Inter-chunk parts: do Sᵀ for dq (S entering the chunk), v dSᵀ for dk (dS of the state leaving it); each state
    # tile is loaded once and used by every sub-chunk. ``carried`` = Σ_v S ⊙ dS, for the gate gradient.
    dq = [jnp.zeros((c, BK), F32) for _ in range(NC)]
    dk = [jnp.zeros((c, BK), F32) for _ in range(NC)]
    carried = jnp.zeros((BK,), F32)
    for vt in range(NV):
        vs = pl.ds(vt * BV, BV)
        hs_t = hs_ref[:, vs]
        dhs_t = dhs_ref[:, vs]
        carried += jnp.sum(hs_t.astype(F32) * dhs_t.astype(F32), axis=1)
        hs_t, dhs_t = hs_t.astype(dt), dhs_t.astype(dt)
        for i in range(NC):
            rows_i = pl.ds(i * c, c)
            dq[i] += dot(do_ref[rows_i, vs].astype(dt), hs_t, trans_b=True)
            dk[i] += dot(v_ref[rows_i, vs].astype(dt), dhs_t, trans_b=True)
    rows = jnp.arange(C)[:, None]
    q_all = q_ref[...].astype(F32)
    k_all = k_ref[...].astype(F32)
    g_all = g_ref[...]
    g_last = g_ref[pl.ds(C - 1, 1), :]
    carried = carried[None, :] * jnp.exp(g_last)  # the incoming state's share of the state leaving the chunk
    if has_seg:
        rel_last = rel_ref[pl.ds(C - 1, 1)]
        carried = jnp.where(rel_last[:, None] == 0, carried, 0.0)  # it survives only a chunk with no start
    tf32 = dt != F32
    xs, ys = [], []  # per sub-chunk: q ⊙ dq - k ⊙ dk_intra and k ⊙ dk_state, the terms of dg
    for i in range(NC):
        s0 = i * c
        rows_i = pl.ds(s0, c)
        g_i = g_ref[rows_i, :]
        q_i = q_ref[rows_i, :].astype(F32)
        k_i = k_ref[rows_i, :].astype(F32)
        dq_i = dq[i] * (jnp.exp(g_i) * scale)
        dk_state = dk[i] * jnp.exp(g_last - g_i)
        if has_seg:
            rel_i = rel_ref[rows_i]
            dq_i = jnp.where((rel_i == 0)[:, None], dq_i, 0.0)  # only the first document saw the incoming state
            dk_state = jnp.where((rel_i == rel_last)[:, None], dk_state, 0.0)  # only the last one leaves the chunk
        dk_i = jnp.zeros((c, BK), F32)
        # Off-diagonal intra-chunk parts (dA already holds the causal / same-document mask). float32 operands (TF32
        # on the GPU when ``dt`` is half precision), not ``dt``: these terms cancel pairwise in dg (+X in a row of
        # dq, -X in a row of dk), and bfloat16 rounding of either side would leave ~3e-3 of dg's error; they are
        # ~1/8 of the kernel's flops.
        if i > 0:
            r = g_ref[pl.ds(s0, 1), :]  # I's first row: columns before I have gates >= r
            k_before = jnp.where(rows < s0, k_all * jnp.exp(jnp.minimum(r - g_all, 0.0)), 0.0)
            dq_i += (jnp.exp(g_i - r) * scale) * dot(da_ref[rows_i, :], k_before, tf32=tf32)
        if i < NC - 1:
            r2 = g_ref[pl.ds(s0 + c - 1, 1), :]  # I's last row: rows after I have gates <= r2
            q_after = jnp.where(rows >= s0 + c, q_all * jnp.exp(jnp.minimum(g_all - r2, 0.0)), 0.0)
            dk_i += (jnp.exp(r2 - g_i) * scale) * dot(da_ref[:, rows_i], q_after, trans_a=True, tf32=tf32)
        # Diagonal sub-block, elementwise in float32: w[i, j, d] = dA_ij e^{b_id - b_jd}.
        w = da_ref[rows_i, rows_i][:, :, None] * jnp.exp(jnp.minimum(g_i[:, None, :] - g_i[None, :, :], 0.0))
        dq_i += scale * jnp.sum(w * k_i[None, :, :], axis=1)
        dk_i += scale * jnp.sum(w * q_i[:, None, :], axis=0)
        dq_ref[rows_i, :] = dq_i
        dk_ref[rows_i, :] = dk_i + dk_state
        xs.append(q_i * dq_i - k_i * dk_i)
        ys.append(k_i * dk_state)
    # dg_t = Σ_{s >= t, same document} x_s + Σ_{s < t} y_s + carried (y is zero outside the chunk's last document,
    # so its sum needs no document mask), zero at document starts. All sums stay inside the chunk.
    sub = jnp.arange(c)
    later = sub[None, :] >= sub[:, None]  # [t, s]: s >= t
    earlier = sub[None, :] < sub[:, None]  # [t, s]: s < t
    rels = [rel_ref[pl.ds(i * c, c)] for i in range(NC)] if has_seg else None
    for i in range(NC):
        if has_seg:
            same = lambda j: rels[j][None, :] == rels[i][:, None]  # [t, s]: same document
            acc = _masked_row_sum(later & same(i), xs[i])
            for j in range(i + 1, NC):
                acc += _masked_row_sum(same(j), xs[j])
        else:
            acc = _masked_row_sum(later, xs[i])
            for j in range(i + 1, NC):
                acc += jnp.sum(xs[j], axis=0, keepdims=True)
        acc += _masked_row_sum(earlier, ys[i])
        for j in range(i):
            acc += jnp.sum(ys[j], axis=0, keepdims=True)
        acc += carried
        if has_seg:  # a document start: its gate multiplies a state that is dropped
            prev = rel_ref[pl.ds(i * c - 1, 1)] if i > 0 else jnp.zeros((1,), rels[i].dtype)
            before = jnp.max(jnp.where(earlier, rels[i][None, :], 0), axis=1)
            acc = jnp.where((rels[i] != jnp.maximum(before, prev))[:, None], 0.0, acc)
        dg_ref[pl.ds(i * c, c), :] = acc


def _masked_row_sum(mask, x):
    """[t, d] = Σ_s mask[t, s] x[s, d] for one sub-chunk, elementwise in float32 (mask [c, c] bool, x [c, BK])."""
    return jnp.sum(jnp.where(mask[:, :, None], x[None, :, :], 0.0), axis=1)


# ----------------------------------------------------------------------------------------------------- launchers


def dstate_pass(q, gc, do, dht, rel, *, scale: float, tiling: Tiling, interpret: bool, state_dtype):
    """Gradients of each chunk's end state dhs [B, NT, H, K, V] (``state_dtype``) and of the initial state
    [B, H, K, V] float32."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    C, BK, BV = tiling.chunk_size, tiling.block_k, tiling.block_v
    NT = T // C
    kmap = lambda b, h, i, j: (b, 0, h, i)
    smap = lambda b, h, i, j: (b, h, i, j)
    in_specs = [
        pl.BlockSpec((SQ, T, SQ, BK), kmap),
        pl.BlockSpec((SQ, T, SQ, BK), kmap),
        pl.BlockSpec((SQ, T, SQ, BV), lambda b, h, i, j: (b, 0, h, j)),
        pl.BlockSpec((SQ, SQ, BK, BV), smap),
    ]
    return launch(
        _dstate_kernel, [q, gc, do, dht], in_specs, rel=rel,
        rel_spec=pl.BlockSpec((SQ, T), lambda b, h, i, j: (b, 0)),
        grid=(B, H, K // BK, V // BV),
        out_specs=[pl.BlockSpec((SQ, NT, SQ, BK, BV), lambda b, h, i, j: (b, 0, h, i, j)),
                   pl.BlockSpec((SQ, SQ, BK, BV), smap)],
        out_shape=[jax.ShapeDtypeStruct((B, NT, H, K, V), state_dtype), jax.ShapeDtypeStruct((B, H, K, V), F32)],
        tiling=tiling, interpret=interpret, name="gla_state_bwd",
        C=C, NT=NT, scale=scale, dt=q.dtype,
    )


def attn_grad(do, v, rel, *, tiling: Tiling, interpret: bool):
    """dA [B, T, H, C] float32 (causal, same document)."""
    B, T, H, V = v.shape
    C, BV = tiling.chunk_size, tiling.block_v
    cmap = lambda b, h, n: (b, n, h, 0)
    return launch(
        _attn_grad_kernel, [do, v], [pl.BlockSpec((SQ, C, SQ, V), cmap)] * 2, rel=rel,
        rel_spec=pl.BlockSpec((SQ, C), lambda b, h, n: (b, n)),
        grid=(B, H, T // C),
        out_specs=pl.BlockSpec((SQ, C, SQ, C), cmap),
        out_shape=jax.ShapeDtypeStruct((B, T, H, C), F32),
        tiling=tiling, interpret=interpret, name="gla_attn_bwd",
        C=C, NV=V // BV, BV=BV, dt=v.dtype,
    )


def value_grad(a, do, k, gc, dhs, rel, *, tiling: Tiling, interpret: bool):
    """dv [B, T, H, V] float32."""
    B, T, H, K = k.shape
    V = do.shape[-1]
    C, BK, BV = tiling.chunk_size, tiling.block_k, tiling.block_v
    cmap = lambda b, h, n, j: (b, n, h, 0)
    vmap = lambda b, h, n, j: (b, n, h, j)
    in_specs = [
        pl.BlockSpec((SQ, C, SQ, C), cmap),
        pl.BlockSpec((SQ, C, SQ, BV), vmap),
        pl.BlockSpec((SQ, C, SQ, K), cmap),
        pl.BlockSpec((SQ, C, SQ, K), cmap),
        pl.BlockSpec((SQ, SQ, SQ, K, BV), lambda b, h, n, j: (b, n, h, 0, j)),
    ]
    return launch(
        _dv_kernel, [a, do, k, gc, dhs], in_specs, rel=rel,
        rel_spec=pl.BlockSpec((SQ, C), lambda b, h, n, j: (b, n)),
        grid=(B, H, T // C, V // BV),
        out_specs=pl.BlockSpec((SQ, C, SQ, BV), vmap),
        out_shape=jax.ShapeDtypeStruct((B, T, H, V), F32),
        tiling=tiling, interpret=interpret, name="gla_dv_bwd",
        C=C, NK=K // BK, BK=BK, dt=k.dtype,
    )


def query_key_grad(q, k, gc, do, v, hs, dhs, da, rel, *, scale: float, tiling: Tiling, interpret: bool):
    """(dq, dk, dg) [B, T, H, K] float32."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, BK, BV = tiling.chunk_size, tiling.block_k_bwd, tiling.block_v
    kmap = lambda b, h, n, kt: (b, n, h, kt)
    fmap = lambda b, h, n, kt: (b, n, h, 0)
    smap = lambda b, h, n, kt: (b, n, h, kt, 0)
    in_specs = [
        *[pl.BlockSpec((SQ, C, SQ, BK), kmap)] * 3,  # q, k, gc
        *[pl.BlockSpec((SQ, C, SQ, V), fmap)] * 2,  # do, v
        *[pl.BlockSpec((SQ, SQ, SQ, BK, V), smap)] * 2,  # hs, dhs
        pl.BlockSpec((SQ, C, SQ, C), fmap),  # da
    ]
    return launch(
        _dqk_kernel, [q, k, gc, do, v, hs, dhs, da], in_specs, rel=rel,
        rel_spec=pl.BlockSpec((SQ, C), lambda b, h, n, kt: (b, n)),
        grid=(B, H, T // C, K // BK),
        out_specs=[pl.BlockSpec((SQ, C, SQ, BK), kmap)] * 3,
        out_shape=[jax.ShapeDtypeStruct((B, T, H, K), F32)] * 3,
        tiling=tiling, interpret=interpret, name="gla_dqk_bwd",
        C=C, NV=V // BV, BV=BV, scale=scale, dt=q.dtype,
    )


def backward(q, k, v, g, h0, rel, a, do, dht, *, scale: float, tiling: Tiling, interpret: bool):
    """Padded inputs and cotangents (do, dht) -> (dq, dk, dv, dg, dh0), all float32."""
    gc = chunk_cumsum(g, tiling.chunk_size)
    do = do.astype(q.dtype)
    dht = dht.astype(F32)
    hs, _ = state_pass(k, v, gc, h0, rel, tiling=tiling, interpret=interpret, state_dtype=q.dtype)
    dhs, dh0 = dstate_pass(q, gc, do, dht, rel, scale=scale, tiling=tiling, interpret=interpret,
                           state_dtype=q.dtype)
    da = attn_grad(do, v, rel, tiling=tiling, interpret=interpret)
    dv = value_grad(a, do, k, gc, dhs, rel, tiling=tiling, interpret=interpret)
    dq, dk, dg = query_key_grad(q, k, gc, do, v, hs, dhs, da, rel, scale=scale, tiling=tiling,
                                interpret=interpret)
    return dq, dk, dv, dg, dh0
