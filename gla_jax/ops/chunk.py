"""Hierarchical chunkwise GLA in pure JAX, with a hand-written backward (``jax.custom_vjp``).

Layout inside: the sequence is padded once to a multiple of the chunk size C, or of G·C with the CPU group loop of G
chunks (zeros for q, k, v and g: a zero key adds nothing and a zero log-gate keeps the state, so padding never
changes results) and viewed as ``[B, H, N, C, D]``.
Per chunk, with b the chunk-local inclusive cumulative gate (float32) and S the state entering the chunk:

    o_i   = scale * ( m_in_i (q_i * e^{b_i}) S  +  sum_{j<=i, same doc} A_ij v_j )
    S'    = keep * diag(e^{b_C}) S  +  sum_j m_out_j (k_j * e^{b_C - b_j})^T v_j
    A_ij  = sum_d q_id k_jd e^{b_id - b_jd}

Only the state pass is sequential (a ``lax.scan`` over chunks of an elementwise update; the chunk-start states are
materialized, so every chunk's output is computed at once as batched einsums). ``A`` is built by bisection
(docs/design.md §1): the lower-left quarter of a block of 2s rows pairs rows i in its second half with rows j in
its first half, and with m the last row of the first half

    A_ij = (q_i * e^{b_i - b_m}) (k_j * e^{b_m - b_j})^T          (both exponents <= 0: nothing overflows)

is one matmul per block, in the matmul dtype (the input dtype on accelerators, see ``default_matmul_dtype``) with
float32 accumulation. Halving from s = C/2 down to the sub-chunk c leaves the diagonal c x c blocks (on CPU c = 1:
only the diagonal itself, q_i · k_i); for c > 1 they are formed elementwise in float32, row i and row i - off
(off <= c/2) in the same pass as row i and row i + c - off (their exponents -|b_i - b_{i-off}| and
-|b_{i+c-off} - b_i| are one expression), so c/2 passes cover all c(c+1)/2 pairs.

Every decay factor (e^{b}, e^{b_C - b} and the bisection's e^{b_i - b_m}, e^{b_m - b_j}) is a product of gates
alpha = e^g <= 1 over the rows in between, multiplied up a binary tree of aligned blocks (``_decay_tree``): no
exponent at all, a precision that does not degrade as |b| grows along the chunk, and a zero gate (α = 0: g = -inf
or <= ``gates.ZERO_LOG_GATE``) makes every product across it exactly 0, as in the recurrence. Only the elementwise
diagonal blocks (c > 1) use exponents of cumulative gates; there zero gates never enter b: they count as 0 there
and separately, as exact multiples of -256, in a second cumulative sum z, and every exponent is
(b_x - b_y) + (z_x - z_y), <= -256 (a factor of exactly 0) where a zero gate lies between x and y (``gates.py``).
dg is 0 at a zero gate (the limit g -> -inf). The backward's diagonal blocks use running products of gates too.

Packed documents (``segment_ids``) are handled with constant masks, never with -inf gates (which would poison the
cumulative sums): ``A_ij`` only within one document, the inter-chunk term only for rows of the document that the
incoming state belongs to (``m_in``), the state update only from the chunk's last document (``m_out``), and the
carried state dropped (``keep = 0``) when a document starts inside the chunk.

Backward (no per-step state is stored; on accelerators the residuals are the inputs, the gate factors
(``_Factors``), the chunk-start states ``[B, H, N, K, V]`` and the masked intra-chunk matrix ``A``; on CPU the
group loop keeps the inputs, the state entering each group and ``A`` (``_kept``) and recomputes the factors and
chunk states, ``chunk_math.token_forward``): a reverse scan over chunks gives the gradient dH of the state leaving
each chunk (and of ``initial_state``); dq, dk, dv follow chunk by chunk with the same bisection. The gate
gradient uses the reverse-cumulative-sum identity of docs/design.md §2, applied per chunk: because g_t only enters
exponent differences across t,

    dg_t = sum_{s>=t, s in chunk} (q_s * dq_s - k_s * dk_s)[intra + inter parts]
           + sum_{j<t, j in chunk} k_j * dk_j[state part]  +  sum_v dH * (keep e^{b_C} S)

which is the global identity (reverse cumsum over the sequence plus the final-state term sum_v S_T * dS_T)
regrouped so that nothing crosses a chunk boundary except dH. The ``i == j`` terms of A (exponent exactly 0) are
left out of the identity, as they cancel exactly in q*dq - k*dk; this keeps dg accurate when gates are very
negative (e.g. log alpha = -20 per step), where the true dg is ~e^-20 times smaller than q*dq.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gla_jax.ops.chunk_math import SUB_CHUNK, custom_vjp_op, doc_masks, group_chunks_or_default, pad_to_chunks
from gla_jax.ops.chunk_math import default_matmul_dtype, state_scan, token_backward, token_forward
from gla_jax.ops.chunk_math import mm as _mm
from gla_jax.ops.chunk_math import cumsum_rows as _cumsum_rows
from gla_jax.ops.gates import finite_gates, is_zero_gate, zero_steps

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


def _masks(doc, first=None):
    """``chunk_math.doc_masks`` with a trailing axis for K where the vector-gate factors need it: m_in, m_out
    [B, 1, N, C, 1], keep [B, 1, N, 1], same [B, 1, N, C, C] (float32)."""
    m_in, m_out, keep, same = doc_masks(doc, first)
    return m_in[..., None], m_out[..., None], keep[..., None], same


class _Factors(NamedTuple):
    """Gate-derived float32 factors of one call, shared by forward and backward."""

    b6: jax.Array  # [B, H, N, ns, c, K] chunk-local inclusive cumulative gate (zero gates counted as 0)
    z6: jax.Array  # [B, H, N, ns, c, K] chunk-local inclusive cumulative zero steps (gla_jax.ops.gates)
    eq: jax.Array  # [B, H, N, C, K] e^{b}: query-side decay from the chunk start (* m_in)
    ek: jax.Array  # [B, H, N, C, K] e^{b_C - b}: key-side decay to the chunk end (* m_out)
    a: jax.Array  # [B, H, N, K] e^{b_C}: whole-chunk decay of the carried state (* keep)
    alpha: jax.Array  # [B, H, N, ns, c, K] the gates e^{g} (exactly 0 at a zero gate)
    halves: tuple  # per bisection level s (``_half_sizes``): ([B, H, N, P, s, K] e^{b_m - b} on the first halves,
    #                 [B, H, N, P, s, K] e^{b - b_m} on the second halves of the blocks of 2s rows, m their middle)
    zero: jax.Array  # [B, H, N, C, K] bool: zero gates


def _half_sizes(C, c):
    """The half-block sizes of the bisection of a C-row chunk down to sub-chunks of c: C/2, C/4, ..., c."""
    out = []
    s = C // 2
    while s >= c:
        out.append(s)
        s //= 2
    return out


def _any_zero_cumsum(g):
    """Chunk-local cumulative zero steps of g [B, H, N, C, K]: computed only when g holds a zero gate (a ``lax.cond``
    on XLA, which skips the other branch), else zeros."""
    return lax.cond(jnp.any(is_zero_gate(g)), lambda g: _cumsum_rows(zero_steps(g)), jnp.zeros_like, g)


def _decay_tree(alpha, C):
    """The decays within aligned blocks of s = 1, 2, 4, .., C rows as products of the gates alpha [.., C, K]:
    {s: (R_s, L_s)} with R_s[i] = alpha over (start of i's block, i] (e^{b_i - b_before}) and L_s[i] = alpha over
    (i, end of i's block] (e^{b_end - b_i}); every factor <= 1, exactly 0 across a zero gate."""
    lead, K = alpha.shape[:-2], alpha.shape[-1]
    R, L = alpha, jnp.ones_like(alpha)
    out = {1: (R, L)}
    s = 1
    while s < C:
        R2, L2 = R.reshape(lead + (C // (2 * s), 2, s, K)), L.reshape(lead + (C // (2 * s), 2, s, K))
        first_total = R2[..., 0, s - 1:, :]  # [.., P, 1, K]: the whole first half
        second_total = R2[..., 1, s - 1:, :]
        R = jnp.stack([R2[..., 0, :, :], R2[..., 1, :, :] * first_total], axis=-3).reshape(alpha.shape)
        L = jnp.stack([L2[..., 0, :, :] * second_total, L2[..., 1, :, :]], axis=-3).reshape(alpha.shape)
        s *= 2
        out[s] = (R, L)
    return out


def _factors(g, doc, c, first=None):
    """Every decay factor of the chunks (all <= 1: products of gates, no exponent at all), plus the document masks
    (or None). g: [B, H, N, C, K] log gates; doc: [B, N, C] or None; c: the sub-chunk.

    The gates alpha = e^g (exactly 0 at a zero gate, ``gla_jax.ops.gates``) are multiplied up a binary tree of
    aligned blocks (``_decay_tree``), which gives the bisection's factors on both halves of every block, e^{b} and
    e^{b_C - b} of the inter-chunk terms, each a product of about 2 log2(C) rounded factors: more precise than the
    exponential of a difference of float32 cumulative sums (|b| grows along the chunk), and a zero gate anywhere
    in a product makes it exactly 0 as in the recurrence. The cumulative gates b (and zero-step counts z) are only
    formed for the elementwise diagonal blocks when c > 1."""
    B, H, N, C, K = g.shape
    zero = is_zero_gate(g)
    alpha = jnp.where(zero, 0.0, jnp.exp(finite_gates(g)))
    tree = _decay_tree(alpha, C)
    eq, ek = tree[C]
    a = eq[:, :, :, -1, :]
    masks = None
    if doc is not None:
        m_in, m_out, keep, same = _masks(doc, first)
        eq, ek, a = eq * m_in, ek * m_out, a * keep
        masks = (m_in, m_out, keep, same)
    halves = []
    for s in _half_sizes(C, c):
        R, L = tree[s]
        halves.append((_split_halves(L, s)[0], _split_halves(R, s)[1]))
    shape6 = (B, H, N, C // c, c, K)
    if c > 1:
        b = _cumsum_rows(finite_gates(g))
        z = _any_zero_cumsum(g)
        b6, z6 = b.reshape(shape6), z.reshape(shape6)
    else:
        b6 = z6 = None
    return _Factors(b6, z6, eq, ek, a, alpha.reshape(shape6), tuple(halves), zero), masks


@functools.lru_cache(maxsize=None)
def _paired_index(c):
    """idx[i, j]: the position of D[i, j] (j <= i) in the diagonal c x c block packed by pass, where pass 0 holds
    D[i, i] and pass off (1..c/2) holds in row r the pair (r, r - off) for r >= off and (r + c - off, r) for r < off;
    (c/2 + 1) c (a zero appended) above the diagonal."""
    idx = np.full((c, c), (c // 2 + 1) * c, np.int32)
    for i in range(c):
        for j in range(i + 1):
            off = i - j
            idx[i, j] = off * c + i if off <= c // 2 else (c - off) * c + j
    return idx


def _diag_blocks(q6, k6, b6, z6):
    """The diagonal sub-blocks D[.., I, i, j] = sum_d q_id k_jd e^{b_id - b_jd} for j <= i (0 above), float32.

    c/2 + 1 elementwise passes (``_paired_index``): pass off pairs row r with row r - off (r >= off) or row
    r + c - off with row r (r < off), whose exponent is -|x| with x = (b_r - b_{r-off mod c}) (+ the zero-step
    counts), <= 0 either way; the sum over d is a matrix-vector product (fast on CPU)."""
    c, K = q6.shape[-2], q6.shape[-1]
    ones = jnp.ones((K,), _F32)
    rows = jnp.arange(c)[:, None]
    packed = [jnp.einsum("...d,d->...", q6 * k6, ones, precision=_HI)]
    for off in range(1, c // 2 + 1):
        kr, qr = jnp.roll(k6, off, axis=-2), jnp.roll(q6, off, axis=-2)
        x = (b6 - jnp.roll(b6, off, axis=-2)) + (z6 - jnp.roll(z6, off, axis=-2))
        p = jnp.where(rows >= off, q6 * kr, qr * k6) * jnp.exp(-jnp.abs(x))
        packed.append(jnp.einsum("...d,d->...", p, ones, precision=_HI))
    packed.append(jnp.zeros_like(packed[0][..., :1]))
    return jnp.take(jnp.concatenate(packed, axis=-1), jnp.asarray(_paired_index(c)), axis=-1)


@functools.lru_cache(maxsize=None)
def _by_offset(c):
    """gather[off, i] -> i * c + (i - off), the flat index of D[i, i - off] (c * c: none, for i < off)."""
    gather = np.full((c, c), c * c, np.int32)
    for off in range(c):
        for i in range(off, c):
            gather[off, i] = i * c + (i - off)
    return gather


def _shift_rows(x, off):
    """x shifted down by ``off`` (traced) rows along axis -2: out[i] = x[i - off] (rows i < off hold garbage that
    callers mask)."""
    return jnp.roll(x, off, axis=-2)


def _diag_grads(q6, k6, alpha, d_blk):
    """Gradients through the strictly-lower part of the diagonal sub-blocks, given dD = d_blk [.., ns, c, c]:
    dq[i] = sum_{j<i} dD_ij k_j E_ij,  dk[j] = sum_{i>j} dD_ij q_i E_ij  (elementwise, float32), with the decay
    E_ij = alpha_{j+1} ... alpha_i built offset by offset as a running product (a ``lax.scan`` over i - j)."""
    c = q6.shape[-2]
    if c == 1:  # 1 x 1 blocks: nothing below the diagonal
        return jnp.zeros_like(q6), jnp.zeros_like(k6)
    flat = jnp.concatenate([d_blk.reshape(d_blk.shape[:-2] + (c * c,)), jnp.zeros_like(d_blk[..., 0, :1])], -1)
    by_offset = jnp.moveaxis(jnp.take(flat, jnp.asarray(_by_offset(c)), axis=-1), -2, 0)[..., None]

    def body(carry, x):
        dq, dk, decay = carry
        off, w = x  # w[i] = dD[i, i - off] (0 where i < off)
        decay = decay * _shift_rows(alpha, off - 1)  # decay[i] = alpha_{i-off+1} ... alpha_i
        dq = dq + w * _shift_rows(k6, off) * decay
        dk = dk + _shift_rows(w * q6 * decay, -off)  # row j receives from row i = j + off
        return (dq, dk, decay), None

    init = (jnp.zeros_like(q6), jnp.zeros_like(k6), jnp.ones_like(q6))
    (dq, dk, _), _ = lax.scan(body, init, (jnp.arange(1, c), by_offset[1:]))
    return dq, dk


def _split_halves(x, s):
    """[B, H, N, C, D] -> ([.., P, s, D] the first, [.., P, s, D] the second half of each block of 2s rows)."""
    B, H, N, C, D = x.shape
    x = x.reshape(B, H, N, C // (2 * s), 2, s, D)
    return x[..., 0, :, :], x[..., 1, :, :]


def _intra_matrix(q6, k6, F, cdt, same):
    """The masked intra-chunk matrix A [B, H, N, C, C] (float32, lower triangular incl. the diagonal), by bisection
    (module docstring): the diagonal c x c blocks elementwise, then for s = c, 2c, .., C/2 every block of 2s rows
    as [[A_top, 0], [Q_s K_sᵀ, A_bottom]] with one batched matmul per level."""
    B, H, N, ns, c, K = q6.shape
    C = ns * c
    q, k = q6.reshape(B, H, N, C, K), k6.reshape(B, H, N, C, K)
    blocks = _diag_blocks(q6, k6, F.b6, F.z6)  # [B, H, N, ns, c, c]
    for s, (f0, f1) in reversed(list(zip(_half_sizes(C, c), F.halves))):
        qh, kh = _split_halves(q, s)[1] * f1, _split_halves(k, s)[0] * f0
        low = _mm("bhnpik,bhnpjk->bhnpij", qh, kh, cdt)  # [B, H, N, P, s, s]
        blk = blocks.reshape(B, H, N, C // (2 * s), 2, s, s)
        top = jnp.concatenate([blk[..., 0, :, :], jnp.zeros_like(low)], axis=-1)
        bottom = jnp.concatenate([low, blk[..., 1, :, :]], axis=-1)
        blocks = jnp.concatenate([top, bottom], axis=-2)  # [B, H, N, P, 2s, 2s]
    A = blocks.reshape(B, H, N, C, C)
    return A if same is None else A * same


def _offdiag_grads(qf, kf, dA, F, c, cdt):
    """Gradients through the bisection's off-diagonal blocks given dA [B, H, N, C, C]: (dq, dk [B, H, N, C, K],
    the diagonal c x c blocks of dA [B, H, N, C/c, c, c])."""
    B, H, N, C, K = qf.shape
    dq, dk = jnp.zeros_like(qf), jnp.zeros_like(kf)
    blocks = dA[:, :, :, None]  # [B, H, N, 1, C, C]
    for s, (f0, f1) in zip(_half_sizes(C, c), F.halves):
        P = C // (2 * s)
        blk = blocks.reshape(B, H, N, P, 2 * s, 2 * s)
        q1, k0 = _split_halves(qf, s)[1] * f1, _split_halves(kf, s)[0] * f0
        dq1 = _mm("bhnpij,bhnpjk->bhnpik", blk[..., s:, :s], k0, cdt) * f1
        dk0 = _mm("bhnpij,bhnpik->bhnpjk", blk[..., s:, :s], q1, cdt) * f0
        zero = jnp.zeros_like(dq1)
        dq = dq + jnp.stack([zero, dq1], axis=4).reshape(B, H, N, C, K)
        dk = dk + jnp.stack([dk0, zero], axis=4).reshape(B, H, N, C, K)
        blocks = jnp.stack([blk[..., :s, :s], blk[..., s:, s:]], axis=4).reshape(B, H, N, 2 * P, s, s)
    return dq, dk, blocks


class _Residuals(NamedTuple):
    """What ``_forward`` leaves for ``_chunk_op_bwd`` (or ``_rebuild`` rebuilds for one group)."""

    q: jax.Array  # [B, H, N, C, K] the inputs as given
    k: jax.Array
    v: jax.Array  # [B, H, N, C, V]
    doc: jax.Array | None  # [B, N, C] running document numbers
    starts: jax.Array  # [B, H, N, K, V] float32 states entering each chunk
    A: jax.Array  # [B, H, N, C, C] float32 masked intra-chunk matrix
    F: _Factors


def _chunk_states(k, v, F, s0):
    """(the state leaving the last chunk [B, H, K, V], the states entering each chunk [B, H, N, K, V]), float32."""
    u = _mm("bhnck,bhncv->bhnkv", k.astype(_F32) * F.ek, v)  # each chunk's contribution to the state leaving it
    return state_scan(F.a, u, s0)


def _forward(cfg, q, k, v, g, s0, doc, first=None):
    scale, c, cdt = cfg[:3]
    F, masks = _factors(g, doc, c, first)
    qf, kf = q.astype(_F32), k.astype(_F32)
    s_final, starts = _chunk_states(k, v, F, s0)
    o = _mm("bhnck,bhnkv->bhncv", qf * F.eq, starts)  # inter-chunk term
    q6, k6 = qf.reshape(F.alpha.shape), kf.reshape(F.alpha.shape)
    A = _intra_matrix(q6, k6, F, cdt, None if masks is None else masks[3])
    o = (o + _mm("bhnij,bhnjv->bhniv", A, v, cdt)) * scale
    return (o, s_final), _Residuals(q, k, v, doc, starts, A, F)


def qk_gate_grads(qf, kf, do, v, same, dq_inter, dk_state, starts, dh, F, *, c: int, cdt):
    """The intra-chunk and gate part of the backward: (dq, dk, dg) [B, H, N, C, K] float32.

    qf, kf: [B, H, N, C, K] float32; do (already times the query scale), v: [B, H, N, C, V]; same: [B, 1, N, C, C]
    same-document mask or None; dq_inter = (do Sᵀ) ⊙ e^b and dk_state = (v dHᵀ) ⊙ e^{b_C - b}: the inter-chunk
    parts [B, H, N, C, K]; starts, dh: [B, H, N, K, V] float32 states entering and gradients of the states leaving
    each chunk; F: ``_factors`` of the gates; c: the sub-chunk; cdt: matmul operand dtype (None: float32).
    dg is the chunk-local identity (module docstring), 0 at a zero gate (the limit g -> -inf)."""
    B, H, N, C, K = qf.shape
    q6, k6 = qf.reshape(F.alpha.shape), kf.reshape(F.alpha.shape)
    # dA = do v^T on the causal (same-document) pattern.
    causal = jnp.asarray(np.tril(np.ones((C, C), np.float32)))
    dA = _mm("bhniv,bhnjv->bhnij", do, v, cdt) * (causal if same is None else causal * same)
    dq_off, dk_off, d_blk = _offdiag_grads(qf, kf, dA, F, c, cdt)
    # Diagonal sub-blocks, strictly below the diagonal (the i == j terms are added last).
    dq_diag, dk_diag = _diag_grads(q6, k6, F.alpha, d_blk)
    d_self = jnp.diagonal(d_blk, axis1=-2, axis2=-1)[..., None]  # [B, H, N, ns, c, 1]

    dq = dq_inter + dq_off + dq_diag.reshape(B, H, N, C, K)
    dk_intra = dk_off + dk_diag.reshape(B, H, N, C, K)
    # Gate gradient (chunk-local identity, see the module docstring).
    x = qf * dq - kf * dk_intra
    y = kf * dk_state
    carried = jnp.sum(dh * F.a[..., None] * starts, axis=-1)  # [B, H, N, K]
    dg = _cumsum_rows(x, "reverse") + _cumsum_rows(y, "exclusive") + carried[:, :, :, None, :]
    # At a zero gate dg is 0 (the limit g -> -inf; the identity gives 0 there only up to rounding).
    dg = jnp.where(F.zero, 0.0, dg)
    dq = dq + (d_self * k6).reshape(B, H, N, C, K)
    dk = dk_intra + dk_state + (d_self * q6).reshape(B, H, N, C, K)
    return dq, dk, dg


def _chunk_op_bwd(cfg, res, cts):
    scale, c, cdt = cfg[:3]
    q, k, v, doc, starts, A, F = res
    do, ds_final = cts
    B, H, N, C, K = q.shape
    do = do.astype(_F32) * scale
    ds_final = ds_final.astype(_F32)
    qf, kf = q.astype(_F32), k.astype(_F32)
    qdec, kdec = qf * F.eq, kf * F.ek

    # Reverse pass over chunks: dS_n = a_n dS_{n+1} + (q e^b)^T do; dH_n = dS_{n+1} is the gradient of the
    # state leaving chunk n, dS_0 that of the initial state.
    w = _mm("bhnck,bhncv->bhnkv", qdec, do)
    ds0, dh = state_scan(F.a, w, ds_final, reverse=True)  # dh: [B, H, N, K, V]

    # Inter-chunk and state-update parts.
    dq_inter = _mm("bhncv,bhnkv->bhnck", do, starts) * F.eq
    dk_state = _mm("bhncv,bhnkv->bhnck", v, dh) * F.ek
    dv = _mm("bhnck,bhnkv->bhncv", kdec, dh) + _mm("bhnij,bhniv->bhnjv", A, do, cdt)  # state part + A^T do

    # Intra-chunk and gate parts (shared with the Mosaic GPU backward).
    dq, dk, dg = qk_gate_grads(qf, kf, do, v, None if doc is None else _masks(doc)[3], dq_inter, dk_state, starts,
                               dh, F, c=c, cdt=cdt)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, ds0, None


def _kept(res):
    """The residual the CPU group loop stores per group: the masked intra-chunk matrix A [B, H, G, C, C] (float32;
    as large as q). Rebuilding it costs the bisection's log2(C) matmuls again; the gate factors and the chunk
    states are cheaper to recompute than to store (``_rebuild``)."""
    return (res.A,)


def _rebuild(cfg, q, k, v, g, s, doc, first, kept):
    """``_forward``'s residuals of one group from its inputs, the state ``s`` entering it and ``_kept``'s A."""
    F, _ = _factors(g, doc, cfg[1], first)
    _, starts = _chunk_states(k, v, F, s)
    return _Residuals(q, k, v, doc, starts, kept[0], F)


def _forward_tokens(cfg, q, k, v, g, s0, doc):
    """``_forward`` on token-major inputs [B, T, H, D] (``chunk_math.token_forward``: the CPU group loop when
    ``cfg[3]`` chunks per group apply, storing A per group; docs/design.md §1)."""
    return token_forward(functools.partial(_forward, cfg), cfg[3], cfg[4], q, k, v, g, s0, doc, keep=_kept)


def _bwd_tokens(cfg, res, cts):
    """``_chunk_op_bwd`` on token-major cotangents (``chunk_math.token_backward``)."""
    return token_backward(functools.partial(_forward, cfg), functools.partial(_chunk_op_bwd, cfg), cfg[3], cfg[4],
                          res, cts, rebuild=functools.partial(_rebuild, cfg))


_chunk_op = custom_vjp_op(_forward_tokens, _bwd_tokens)


#: Sub-chunk of the pure-JAX chunk form on CPU: 1, so the bisection runs down to single rows and there is no
#: elementwise diagonal block at all (every pair (i, j < i) is in some level's matmul; the diagonal is q_i · k_i).
#: Measured side by side at T = 8192 (B=1, H=4, K=V=64, float32, docs/design.md §1): fwd+bwd 0.81-0.91x the time of
#: sub-chunks of 8, 0.88x of 2, forward within noise. Accelerators keep ``SUB_CHUNK`` (16: tensor-core tiles, and
#: XLA's GPU/TPU matmuls gain nothing from rows of 1..8).
CPU_SUB_CHUNK = 1


def default_sub_chunk(matmul_dtype=jnp.float32):
    """Sub-chunk of the diagonal blocks: ``CPU_SUB_CHUNK`` on CPU with float32 matmuls, else ``SUB_CHUNK`` (with
    half-precision matmul operands the diagonal blocks stay float32 elementwise: the pairs closest to the diagonal
    carry the largest decays, and bf16 rounding there doubles dg's error)."""
    if jax.default_backend() == "cpu" and jnp.dtype(matmul_dtype) == jnp.float32:
        return CPU_SUB_CHUNK
    return SUB_CHUNK


def gla_chunk(q, k, v, g, *, scale, initial_state=None, segment_ids=None, chunk_size=64, matmul_dtype=None,
              group_chunks=None, sub_chunk=None):
    """Hierarchical chunkwise GLA (chunks of ``chunk_size``, bisected down to ``sub_chunk``), differentiable via a
    custom VJP.

    q, k, g: [B, T, H, K]; v: [B, T, H, V] (float32/bfloat16/float16); g <= 0 is the log forget gate;
    initial_state: [B, H, K, V] or None; segment_ids: [B, T] int or None (state reset at each document start).
    chunk_size: a power of two >= 16 (or a power of two below 16, then also the sub-chunk).
    matmul_dtype: operand dtype of the intra-chunk matmuls (the bisection's blocks, A v and their gradients),
    always with float32 accumulation; default ``default_matmul_dtype(input dtype)``. Gates, the diagonal
    sub-blocks and everything touching the state are float32.
    group_chunks: chunks per step of the loop over the sequence (0: all chunks at once); default
    ``default_group_chunks()`` (``CPU_GROUP_CHUNKS`` on CPU, 0 on accelerators).
    sub_chunk: rows of the elementwise diagonal blocks (a power of two <= chunk_size); default
    ``default_sub_chunk(matmul dtype)`` (1 on CPU with float32 matmuls, 16 elsewhere).
    Returns (o [B, T, H, V] float32, final_state [B, H, K, V] float32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = int(chunk_size)
    if C < 1 or C & (C - 1):
        raise ValueError(f"chunk_size: expected a power of two, got {chunk_size!r}")
    in_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if jnp.finfo(in_dtype).bits > 32:
        in_dtype = jnp.dtype(_F32)
    mdt = default_matmul_dtype(in_dtype) if matmul_dtype is None else jnp.dtype(matmul_dtype)
    c = min(default_sub_chunk(mdt) if sub_chunk is None else sub_chunk, C)
    if not isinstance(c, int) or isinstance(c, bool) or c < 1 or c & (c - 1):
        raise ValueError(f"sub_chunk: expected a power of two, got {sub_chunk!r}")
    G = group_chunks_or_default(group_chunks)
    (q, k, v, g), doc = pad_to_chunks([q.astype(in_dtype), k.astype(in_dtype), v.astype(in_dtype), g.astype(_F32)],
                                      segment_ids, C, G)
    s0 = jnp.zeros((B, H, K, V), _F32) if initial_state is None else initial_state.astype(_F32)
    o, s_final = _chunk_op((float(scale), c, mdt, G, C), q, k, v, g, s0, doc)
    return o[:, :T], s_final
