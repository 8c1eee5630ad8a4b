"""Two-level chunkwise GLA in pure JAX, with a hand-written backward (``jax.custom_vjp``).

Layout inside: the sequence is padded to a multiple of the chunk size C (zeros for q, k, v and g: a zero key adds
nothing and a zero log-gate keeps the state, so padding never changes results) and viewed as ``[B, H, N, C, D]``.
Per chunk, with b the chunk-local inclusive cumulative gate (float32) and S the state entering the chunk:

    o_i   = scale * ( m_in_i (q_i * e^{b_i}) S  +  sum_{j<=i, same doc} A_ij v_j )
    S'    = keep * diag(e^{b_C}) S  +  sum_j m_out_j (k_j * e^{b_C - b_j})^T v_j
    A_ij  = sum_d q_id k_jd e^{b_id - b_jd}

Only the state pass is sequential (a ``lax.scan`` over chunks of an elementwise update; the chunk-start states are
materialized, so every chunk's output is computed at once as batched einsums). ``A`` is built on two levels:
the chunk is cut into sub-chunks of c = 16; a pair of sub-chunks (I, J < I) is a matmul

    A_IJ = (q_I * e^{b_I - r_I}) (k_J * e^{e_J - b_J} * e^{r_I - e_J})^T

(r_I: b at the first row of I, e_J: b at the last row of J; every exponent <= 0, so nothing overflows), done in the
matmul dtype (the input dtype on accelerators, see ``default_matmul_dtype``) with float32 accumulation, one row
block I at a time against all J < I; the diagonal 16x16 blocks are formed elementwise in float32 log space, only
j <= i, walked by the offset i - j in a ``lax.scan`` (exponents b_i - b_{i-off} <= 0).

Zero gates (α = 0: g = -inf or <= ``gates.ZERO_LOG_GATE``) never enter b: they count as 0 there and separately, as
exact multiples of -256, in a second cumulative sum z; every exponent below is (b_x - b_y) + (z_x - z_y), unchanged
where no zero gate lies between x and y and <= -256 (a factor of exactly 0) where one does (``gates.py``). A finite
stand-in for -inf inside b would instead push the later cumulative gates to |b| >= 104, where float32 rounds small
gates to ~1e-5. dg is 0 at a zero gate (the limit g -> -inf).

Packed documents (``segment_ids``) are handled with constant masks, never with -inf gates (which would poison the
cumulative sums): ``A_ij`` only within one document, the inter-chunk term only for rows of the document that the
incoming state belongs to (``m_in``), the state update only from the chunk's last document (``m_out``), and the
carried state dropped (``keep = 0``) when a document starts inside the chunk.

Backward (no per-step state is stored; the residuals are the inputs, the gate factors (``_Factors``, each the
size of k), the chunk-start states ``[B, H, N, K, V]`` and the masked intra-chunk matrix ``A`` ``[B, H, N, C, C]``): a reverse scan over chunks gives the gradient dH of
the state leaving each chunk (and of ``initial_state``); dq, dk, dv follow chunk by chunk with the same two-level
structure. The gate gradient uses the reverse-cumulative-sum identity of docs/design.md §2, applied per chunk: because
g_t only enters exponent differences across t,

    dg_t = sum_{s>=t, s in chunk} (q_s * dq_s - k_s * dk_s)[intra + inter parts]
           + sum_{j<t, j in chunk} k_j * dk_j[state part]  +  sum_v dH * (keep e^{b_C} S)

which is the global identity (reverse cumsum over the sequence plus the final-state term sum_v S_T * dS_T)
regrouped so that nothing crosses a chunk boundary except dH. The ``i == j`` terms of A (exponent exactly 0) are
left out of the identity, as they cancel exactly in q*dq - k*dk; this keeps dg accurate when gates are very
negative (e.g. log alpha = -20 per step), where the true dg is ~e^-20 times smaller than q*dq.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gla_jax.ops.chunk_math import SUB_CHUNK, custom_vjp_op, default_group_chunks, doc_masks, document_index
from gla_jax.ops.chunk_math import grouped_backward, grouped_forward, state_scan, token_backward, token_forward
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
    """Gate-derived float32 factors of one call, shared by forward and backward (saved as residuals)."""

    b6: jax.Array  # [B, H, N, ns, c, K] chunk-local inclusive cumulative gate (zero gates counted as 0)
    z6: jax.Array  # [B, H, N, ns, c, K] chunk-local inclusive cumulative zero steps (gla_jax.ops.gates)
    eq: jax.Array  # [B, H, N, C, K] e^{b}: query-side decay from the chunk start (* m_in)
    ek: jax.Array  # [B, H, N, C, K] e^{b_C - b}: key-side decay to the chunk end (* m_out)
    a: jax.Array  # [B, H, N, K] e^{b_C}: whole-chunk decay of the carried state (* keep)
    eqs: jax.Array  # [B, H, N, ns, c, K] e^{b - r_I}: decay from the sub-chunk's first row
    eks: jax.Array  # [B, H, N, ns, c, K] e^{e_J - b}: decay to the sub-chunk's last row
    rho: jax.Array  # [B, H, N, ns, ns, K] e^{r_I - e_J} (meaningful for J < I only; clamped to <= 1)
    al: jax.Array  # [B, H, N, ns, c, K] the gate itself, alpha = e^{g} (exactly 0 at a zero gate)
    lev: tuple = ()  # per bisection level s = C/2 .. c: [B, H, N, C, K] e^{-|b - b_m|}, m the row before the half


def _factors(g, doc, c, first=None):
    """Cumulative gates and every decay factor (all exponents <= 0), plus the document masks (or None).

    Zero gates (α = 0, ``gla_jax.ops.gates``) enter as a separate, exactly summed cumulative count: every exponent
    below is (b_x - b_y) + (z_x - z_y), which is the plain gate difference when no zero gate lies between the two
    positions and <= -256 (a factor of exactly 0) when one does."""
    B, H, N, C, K = g.shape
    ns = C // c
    b = _cumsum_rows(finite_gates(g))  # [B, H, N, C, K]
    if ZCOND:
        z = lax.cond(jnp.any(is_zero_gate(g)), lambda g: _cumsum_rows(zero_steps(g)), jnp.zeros_like, g)
    else:
        z = _cumsum_rows(zero_steps(g))  # multiples of ZERO_GATE_STEP: exact
    bC, zC = b[:, :, :, -1, :], z[:, :, :, -1, :]
    eq = jnp.exp(b + z)
    ek = jnp.exp((bC[:, :, :, None, :] - b) + (zC[:, :, :, None, :] - z))
    a = jnp.exp(bC + zC)
    masks = None
    if doc is not None:
        m_in, m_out, keep, same = _masks(doc, first)
        eq, ek, a = eq * m_in, ek * m_out, a * keep
        masks = (m_in, m_out, keep, same)
    b6, z6 = b.reshape(B, H, N, ns, c, K), z.reshape(B, H, N, ns, c, K)
    r, rz = b6[..., 0, :], z6[..., 0, :]  # [B, H, N, ns, K]: at the first row of each sub-chunk
    e, ez = b6[..., -1, :], z6[..., -1, :]  # at the last row
    eqs = jnp.exp((b6 - r[..., None, :]) + (z6 - rz[..., None, :]))
    eks = jnp.exp((e[..., None, :] - b6) + (ez[..., None, :] - z6))
    rho = jnp.exp(jnp.minimum((r[..., :, None, :] - e[..., None, :, :]) + (rz[..., :, None, :] - ez[..., None, :, :]),
                              0.0))
    al = jnp.where(is_zero_gate(g), 0.0, jnp.exp(finite_gates(g))).reshape(b6.shape)
    lev = []
    sz = C // 2
    while sz >= c:
        P = C // (2 * sz)
        b7, z7 = b.reshape(B, H, N, P, 2 * sz, K), z.reshape(B, H, N, P, 2 * sz, K)
        bm, zm = b7[..., sz - 1:sz, :], z7[..., sz - 1:sz, :]
        lev.append(jnp.exp(-jnp.abs((b7 - bm) + (z7 - zm))).reshape(B, H, N, C, K))
        sz //= 2
    return _Factors(b6, z6, eq, ek, a, eqs, eks, rho, al, tuple(lev)), masks


def _gap(b6, z6, off):
    """min((b_i - b_{i-off}) + (z_i - z_{i-off}), 0) along the sub-chunk rows (rows i < off: garbage, masked)."""
    return jnp.minimum((b6 - _shift_rows(b6, off)) + (z6 - _shift_rows(z6, off)), 0.0)


def _khat(kt, rho, I):
    """Keys of sub-chunks J < I seen from sub-chunk I: kt_J * e^{r_I - e_J}, flattened to [B, H, N, I*c, K]."""
    B, H, N, _, c, K = kt.shape
    return (kt[:, :, :, :I] * rho[:, :, :, I, :I, None, :]).reshape(B, H, N, I * c, K)


def _shift_rows(x, off):
    """x shifted down by ``off`` (traced) rows along axis -2: out[i] = x[i - off] (rows i < off hold garbage that
    callers mask)."""
    return jnp.roll(x, off, axis=-2)


def _diag_blocks(q6, k6, b6, z6):
    """The diagonal sub-blocks D[.., I, i, j] = sum_d q_id k_jd e^{b_id - b_jd} for j <= i (0 above), float32.

    Elementwise in log space, walked by the offset i - j (a ``lax.scan`` over offsets, so the program stays
    small) so that every exponent is <= 0; the sum over d is a matrix-vector product (fast on CPU).
    """
    c, K = q6.shape[-2], q6.shape[-1]
    ones = jnp.ones((K,), _F32)
    rows_i = jnp.arange(c)[:, None]

    def body(_, off):
        p = q6 * _shift_rows(k6, off) * jnp.exp(_gap(b6, z6, off))
        p = jnp.where(rows_i >= off, p, 0.0)
        return None, jnp.einsum("...d,d->...", p, ones, precision=_HI)  # [.., ns, c]: D[i, i - off]

    _, by_offset = lax.scan(body, None, jnp.arange(c))  # [c(off), B, H, N, ns, c(i)]
    by_offset = jnp.moveaxis(by_offset, 0, -2).reshape(q6.shape[:-2] + (c * c,))
    by_offset = jnp.concatenate([by_offset, jnp.zeros_like(by_offset[..., :1])], axis=-1)
    return jnp.take(by_offset, jnp.asarray(_offset_index(c)), axis=-1)


@functools.lru_cache(maxsize=None)
def _offset_index(c):
    """idx[i, j] into the flattened [offset, i] layout of _diag_blocks (c * c: the zero entry, for j > i)."""
    idx = np.full((c, c), c * c, np.int32)
    for i in range(c):
        for j in range(i + 1):
            idx[i, j] = (i - j) * c + i
    return idx


DIAG_MODE = "prod"


def _diag_blocks_prod(q6, k6, al6):
    c, K = q6.shape[-2], q6.shape[-1]
    ones = jnp.ones((K,), _F32)
    rows_i = jnp.arange(c)[:, None]
    d0 = jnp.einsum("...d,d->...", q6 * k6, ones, precision=_HI)

    def body(E, off):
        E = E * _shift_rows(al6, off - 1)
        p = jnp.where(rows_i >= off, q6 * _shift_rows(k6, off) * E, 0.0)
        return E, jnp.einsum("...d,d->...", p, ones, precision=_HI)

    _, by_offset = lax.scan(body, jnp.ones_like(q6), jnp.arange(1, c))
    by_offset = jnp.concatenate([d0[None], by_offset], axis=0)
    by_offset = jnp.moveaxis(by_offset, 0, -2).reshape(q6.shape[:-2] + (c * c,))
    by_offset = jnp.concatenate([by_offset, jnp.zeros_like(by_offset[..., :1])], axis=-1)
    return jnp.take(by_offset, jnp.asarray(_offset_index(c)), axis=-1)


def _diag_grads_prod(q6, k6, al6, d_blk):
    c = q6.shape[-2]
    flat = jnp.concatenate([d_blk.reshape(d_blk.shape[:-2] + (c * c,)), jnp.zeros_like(d_blk[..., 0, :1])], -1)
    gather = np.full((c, c), c * c, np.int32)
    for off in range(c):
        for i in range(off, c):
            gather[off, i] = i * c + (i - off)
    by_offset = jnp.moveaxis(jnp.take(flat, jnp.asarray(gather), axis=-1), -2, 0)[..., None]

    def body(carry, x):
        dq, dk, E = carry
        off, w = x
        E = E * _shift_rows(al6, off - 1)
        dq = dq + w * _shift_rows(k6, off) * E
        dk = dk + _shift_rows(w * q6 * E, -off)
        return (dq, dk, E), None

    (dq, dk, _), _ = lax.scan(body, (jnp.zeros_like(q6), jnp.zeros_like(k6), jnp.ones_like(q6)),
                              (jnp.arange(1, c), by_offset[1:]))
    return dq, dk


@functools.lru_cache(maxsize=None)
def _packed_offsets(c):
    """(starts, idx): the diagonal-block entries packed by offset, off = 0..c-1 each holding rows m = 0..c-off-1
    (entry (i, j) = (m + off, m)), starts[off] their first position; idx[i, j] the packed position of (i, j) for j <= i
    and c(c+1)/2 (a zero appended) above the diagonal."""
    starts = np.concatenate([[0], np.cumsum([c - off for off in range(c)])]).astype(np.int32)
    idx = np.full((c, c), starts[-1], np.int32)
    for i in range(c):
        for j in range(i + 1):
            idx[i, j] = starts[i - j] + j
    return starts, idx


def _decay_by_offset(al6):
    """[E_1, ..., E_{c-1}]: E_off [.., c - off, K] = prod_{t=m+1}^{m+off} alpha_t, the decay from row m to row m + off
    (a product of gates <= 1: no exponent at all, exactly 0 across a zero gate)."""
    c = al6.shape[-2]
    out = [al6[..., 1:, :]]
    for off in range(2, c):
        out.append(out[-1][..., 1:, :] * al6[..., 1:c - off + 1, :])
    return out


def _diag_blocks_static(q6, k6, al6):
    c, K = q6.shape[-2], q6.shape[-1]
    E = _decay_by_offset(al6)
    if EB:
        E = lax.optimization_barrier(E)
    parts = [q6 * k6] + [q6[..., off:, :] * k6[..., :c - off, :] * E[off - 1] for off in range(1, c)]
    parts.append(jnp.zeros_like(q6[..., :1, :]))
    packed = jnp.einsum("...d,d->...", jnp.concatenate(parts, axis=-2), jnp.ones((K,), _F32), precision=_HI)
    return jnp.take(packed, jnp.asarray(_packed_offsets(c)[1]), axis=-1)


def _diag_grads_static(q6, k6, al6, d_blk):
    c = q6.shape[-2]
    starts, _ = _packed_offsets(c)
    gather = np.zeros(int(starts[-1]), np.int32)
    for off in range(c):
        for m in range(c - off):
            gather[starts[off] + m] = (m + off) * c + m
    w = jnp.take(d_blk.reshape(d_blk.shape[:-2] + (c * c,)), jnp.asarray(gather), axis=-1)[..., None]
    E = _decay_by_offset(al6)
    if EB:
        E = lax.optimization_barrier(E)
    dq, dk = jnp.zeros_like(q6), jnp.zeros_like(k6)
    zero = [(0, 0)] * (q6.ndim - 2)
    for off in range(1, c):
        wo = w[..., starts[off]:starts[off + 1], :] * E[off - 1]
        dq = dq + jnp.pad(wo * k6[..., :c - off, :], zero + [(off, 0), (0, 0)])
        dk = dk + jnp.pad(wo * q6[..., off:, :], zero + [(0, off), (0, 0)])
    return dq, dk


def _paired_gap(b6, z6, off):
    """-|x| with x = (b - roll(b, off)) + (z - roll(z, off)) along the sub-chunk rows: the (non-positive) exponent
    of pass ``off``'s pair in each row."""
    x = (b6 - jnp.roll(b6, off, axis=-2)) + (z6 - jnp.roll(z6, off, axis=-2))
    return -jnp.abs(x)


@functools.lru_cache(maxsize=None)
def _paired_index(c):
    """idx[i, j] into the packed [pass, row] layout of the paired diagonal passes (c/2 + 1 passes of c rows, then a
    zero), and gather[pass, row] -> i * c + j of the pair a row holds (c * c: none)."""
    P = c // 2 + 1
    idx = np.full((c, c), P * c, np.int32)
    gather = np.full((P, c), c * c, np.int32)
    for i in range(c):
        for j in range(i + 1):
            off = i - j
            if off <= c // 2:
                idx[i, j] = off * c + i
            else:
                idx[i, j] = (c - off) * c + j
    for off in range(P):
        for r in range(c):
            if off == 0:
                gather[off, r] = r * c + r
            elif r >= off:
                gather[off, r] = r * c + (r - off)
            elif off < c - off:
                gather[off, r] = (r + c - off) * c + r
    return idx, gather


def _diag_blocks_paired(q6, k6, b6, z6):
    c, K = q6.shape[-2], q6.shape[-1]
    ones = jnp.ones((K,), _F32)
    rows = jnp.arange(c)[:, None]
    packed = [jnp.einsum("...d,d->...", q6 * k6, ones, precision=_HI)]
    for off in range(1, c // 2 + 1):
        kr, qr = jnp.roll(k6, off, axis=-2), jnp.roll(q6, off, axis=-2)
        p = jnp.where(rows >= off, q6 * kr, qr * k6) * jnp.exp(_paired_gap(b6, z6, off))
        packed.append(jnp.einsum("...d,d->...", p, ones, precision=_HI))
    packed.append(jnp.zeros_like(packed[0][..., :1]))
    return jnp.take(jnp.concatenate(packed, axis=-1), jnp.asarray(_paired_index(c)[0]), axis=-1)


def _diag_grads_paired(q6, k6, b6, z6, d_blk):
    c = q6.shape[-2]
    _, gather = _paired_index(c)
    flat = jnp.concatenate([d_blk.reshape(d_blk.shape[:-2] + (c * c,)), jnp.zeros_like(d_blk[..., 0, :1])], -1)
    rows = jnp.arange(c)[:, None]
    dq, dk = jnp.zeros_like(q6), jnp.zeros_like(k6)
    for off in range(1, c // 2 + 1):
        w = jnp.take(flat, jnp.asarray(gather[off]), axis=-1)[..., None]  # [.., ns, c, 1]
        e = w * jnp.exp(_paired_gap(b6, z6, off))
        kr, qr = jnp.roll(k6, off, axis=-2), jnp.roll(q6, off, axis=-2)
        low = rows >= off
        dq = dq + jnp.where(low, e * kr, 0.0) + jnp.roll(jnp.where(low, 0.0, e * k6), c - off, axis=-2)
        dk = dk + jnp.roll(jnp.where(low, e * q6, 0.0), -off, axis=-2) + jnp.where(low, 0.0, e * qr)
    return dq, dk


def _diag_grads_unrolled(q6, k6, al6, d_blk):
    c = q6.shape[-2]
    flat = jnp.concatenate([d_blk.reshape(d_blk.shape[:-2] + (c * c,)), jnp.zeros_like(d_blk[..., 0, :1])], -1)
    gather = np.full((c, c), c * c, np.int32)
    for off in range(c):
        for i in range(off, c):
            gather[off, i] = i * c + (i - off)
    by_offset = jnp.take(flat, jnp.asarray(gather), axis=-1)[..., None]  # [.., ns, c(off), c(i), 1]
    dq, dk = jnp.zeros_like(q6), jnp.zeros_like(k6)
    E = jnp.ones_like(q6)
    zrow = [(0, 0)] * (q6.ndim - 2)
    def down(x, n):  # out[i] = x[i - n], zero-filled
        return jnp.pad(x[..., :c - n, :], zrow + [(n, 0), (0, 0)])
    def up(x, n):  # out[j] = x[j + n], zero-filled
        return jnp.pad(x[..., n:, :], zrow + [(0, n), (0, 0)])
    for off in range(1, c):
        E = E * down(al6, off - 1)
        w = by_offset[..., off, :, :]
        dq = dq + w * down(k6, off) * E
        dk = dk + up(w * q6 * E, off)
    return dq, dk


def _diag_grads(q6, k6, b6, z6, d_blk):
    """Gradients through the strictly-lower part of the diagonal sub-blocks, given dD = d_blk [.., ns, c, c]:
    dq[i] = sum_{j<i} dD_ij k_j e^{b_i - b_j},  dk[j] = sum_{i>j} dD_ij q_i e^{b_i - b_j}  (elementwise, float32)."""
    c = q6.shape[-2]
    # by_offset[off, .., i] = dD[i, i - off] (0 where i < off)
    idx = _offset_index(c)
    flat = jnp.concatenate([d_blk.reshape(d_blk.shape[:-2] + (c * c,)), jnp.zeros_like(d_blk[..., 0, :1])], -1)
    gather = np.full((c, c), c * c, np.int32)  # gather[off, i] -> flat index of (i, i - off)
    for off in range(c):
        for i in range(off, c):
            gather[off, i] = i * c + (i - off)
    by_offset = jnp.moveaxis(jnp.take(flat, jnp.asarray(gather), axis=-1), -2, 0)[..., None]  # [c, .., ns, c, 1]
    del idx

    def body(carry, x):
        dq, dk = carry
        off, w = x  # w[i] = dD[i, i - off]
        e = jnp.exp(_gap(b6, z6, off))
        dq = dq + w * _shift_rows(k6, off) * e
        dk = dk + _shift_rows(w * q6 * e, -off)  # row j receives from row i = j + off
        return (dq, dk), None

    (dq, dk), _ = lax.scan(body, (jnp.zeros_like(q6), jnp.zeros_like(k6)), (jnp.arange(1, c), by_offset[1:]))
    return dq, dk


def _intra_bisect(q6, k6, F, cdt, same):
    B, H, N, ns, c, K = q6.shape
    C = ns * c
    d = _diag_blocks_paired(q6, k6, F.b6, F.z6) if DIAG_MODE == "paired" else _diag_blocks_prod(q6, k6, F.al)
    q, k = q6.reshape(B, H, N, C, K), k6.reshape(B, H, N, C, K)
    blocks = d  # [B, H, N, ns, c, c]
    sizes = []
    sz = C // 2
    while sz >= c:
        sizes.append(sz)
        sz //= 2
    for li, sz in reversed(list(enumerate(sizes))):
        P = C // (2 * sz)
        f = F.lev[li].reshape(B, H, N, P, 2, sz, K)
        qh = q.reshape(f.shape)[..., 1, :, :] * f[..., 1, :, :]
        kh = k.reshape(f.shape)[..., 0, :, :] * f[..., 0, :, :]
        a_s = _mm("bhnpik,bhnpjk->bhnpij", qh, kh, cdt)  # [B, H, N, P, sz, sz]
        blk = blocks.reshape(B, H, N, P, 2, sz, sz)
        top = jnp.concatenate([blk[..., 0, :, :], jnp.zeros_like(a_s)], axis=-1)
        bot = jnp.concatenate([a_s, blk[..., 1, :, :]], axis=-1)
        blocks = jnp.concatenate([top, bot], axis=-2)  # [B, H, N, P, 2sz, 2sz]
    A = blocks.reshape(B, H, N, C, C)
    return A if same is None else A * same


def _offdiag_grads_bisect(qf, kf, dA, F, cdt):
    """dq, dk [B, H, N, C, K] through the off-diagonal blocks, and the diagonal c x c blocks of dA."""
    B, H, N, C, K = qf.shape
    c = F.b6.shape[-2]
    dq = jnp.zeros_like(qf)
    dk = jnp.zeros_like(kf)
    blocks = dA[:, :, :, None]  # [B, H, N, 1, C, C]
    sz = C // 2
    li = 0
    while sz >= c:
        P = C // (2 * sz)
        blk = blocks.reshape(B, H, N, P, 2 * sz, 2 * sz)
        dA_s = blk[..., sz:, :sz]  # [B, H, N, P, sz, sz]
        f = F.lev[li].reshape(B, H, N, P, 2, sz, K)
        qh = qf.reshape(f.shape)[..., 1, :, :] * f[..., 1, :, :]
        kh = kf.reshape(f.shape)[..., 0, :, :] * f[..., 0, :, :]
        dqh = _mm("bhnpij,bhnpjk->bhnpik", dA_s, kh, cdt) * f[..., 1, :, :]
        dkh = _mm("bhnpij,bhnpik->bhnpjk", dA_s, qh, cdt) * f[..., 0, :, :]
        z = jnp.zeros_like(dqh)
        dq = dq + jnp.stack([z, dqh], axis=4).reshape(B, H, N, C, K)
        dk = dk + jnp.stack([dkh, z], axis=4).reshape(B, H, N, C, K)
        blocks = jnp.stack([blk[..., :sz, :sz], blk[..., sz:, sz:]], axis=4).reshape(B, H, N, 2 * P, sz, sz)
        sz //= 2
        li += 1
    return dq, dk, blocks  # blocks: [B, H, N, ns, c, c]


def _intra_matrix(q6, k6, F, cdt, same):
    if OFFDIAG == "bisect":
        return _intra_bisect(q6, k6, F, cdt, same)
    return _intra_matrix_rows(q6, k6, F, cdt, same)


def _intra_matrix_rows(q6, k6, F, cdt, same):
    """The masked intra-chunk matrix A [B, H, N, C, C] (float32, lower triangular incl. the diagonal).

    Row block I: [A_I0 .. A_I(I-1) | D_I | 0]; the off-diagonal part of the row block is one matmul of qhat_I
    against the keys of all earlier sub-chunks, only the J < I pairs being formed.
    """
    B, H, N, ns, c, K = q6.shape
    qhat, kt = q6 * F.eqs, k6 * F.eks
    if DIAG_MODE == "paired":
        d = _diag_blocks_paired(q6, k6, F.b6, F.z6)
    elif DIAG_MODE == "static":
        d = _diag_blocks_static(q6, k6, F.al)
    else:
        d = _diag_blocks_prod(q6, k6, F.al) if DIAG_MODE == "prod" else _diag_blocks(q6, k6, F.b6, F.z6)
    keys_minor = jax.default_backend() == "cpu"
    if keys_minor:  # XLA:CPU: the narrow matmuls contract the keys' leading axis (docs/design.md §1)
        ktT, rhoT = jnp.moveaxis(kt, -1, 3), jnp.moveaxis(F.rho, -1, 3)  # [B, H, N, K, ns, c], [B, H, N, K, ns, ns]
    rows = []
    for I in range(ns):
        parts = []
        if I and keys_minor:
            khat_t = (ktT[:, :, :, :, :I] * rhoT[:, :, :, :, I, :I, None]).reshape(B, H, N, K, I * c)
            parts.append(_mm("bhnik,bhnkj->bhnij", qhat[:, :, :, I], khat_t, cdt))
        elif I:
            parts.append(_mm("bhnik,bhnjk->bhnij", qhat[:, :, :, I], _khat(kt, F.rho, I), cdt))
        parts.append(d[:, :, :, I])
        if I < ns - 1:
            parts.append(jnp.zeros((B, H, N, c, (ns - 1 - I) * c), _F32))
        rows.append(jnp.concatenate(parts, axis=-1))
    A = jnp.concatenate(rows, axis=-2)
    return A if same is None else A * same


def _forward(cfg, q, k, v, g, s0, doc, first=None):
    scale, c, cdt = cfg[:3]
    B, H, N, C, K = q.shape
    F, masks = _factors(g, doc, c, first)
    qf, kf = q.astype(_F32), k.astype(_F32)
    u = _mm("bhnck,bhncv->bhnkv", kf * F.ek, v)  # each chunk's contribution to the state leaving it
    s_final, starts = state_scan(F.a, u, s0)
    o = _mm("bhnck,bhnkv->bhncv", qf * F.eq, starts)  # inter-chunk term
    q6, k6 = qf.reshape(F.b6.shape), kf.reshape(F.b6.shape)
    A = _intra_matrix(q6, k6, F, cdt, None if masks is None else masks[3])
    o = (o + _mm("bhnij,bhnjv->bhniv", A, v, cdt)) * scale
    return (o, s_final), (q, k, v, doc, starts, A, F)


def qk_gate_grads(qf, kf, do, v, same, dq_inter, dk_state, starts, dh, F, *, c: int, cdt):
    """The intra-chunk and gate part of the backward: (dq, dk, dg) [B, H, N, C, K] float32.

    qf, kf: [B, H, N, C, K] float32; do (already times the query scale), v: [B, H, N, C, V]; same: [B, 1, N, C, C]
    same-document mask or None; dq_inter = (do Sᵀ) ⊙ e^b and dk_state = (v dHᵀ) ⊙ e^{b_C - b}: the inter-chunk
    parts [B, H, N, C, K]; starts, dh: [B, H, N, K, V] float32 states entering and gradients of the states leaving
    each chunk; F: ``_factors`` of the gates; c: the sub-chunk; cdt: matmul operand dtype (None: float32).
    dg is the chunk-local identity (module docstring), 0 at a zero gate (the limit g -> -inf)."""
    B, H, N, C, K = qf.shape
    ns = C // c
    q6, k6 = qf.reshape(F.b6.shape), kf.reshape(F.b6.shape)
    # dA = do v^T on the causal (same-document) pattern.
    causal = jnp.asarray(np.tril(np.ones((C, C), np.float32)))
    dA = _mm("bhniv,bhnjv->bhnij", do, v, cdt) * (causal if same is None else causal * same)
    if OFFDIAG == "bisect":
        dq_off, dk_off, d_blk = _offdiag_grads_bisect(qf, kf, dA, F, cdt)
        dq_off, dk_off = dq_off.reshape(q6.shape), dk_off.reshape(k6.shape)
    else:
        dq_off, dk_off, d_blk = _offdiag_rows(q6, k6, dA, F, cdt)
    return _qk_rest(qf, kf, q6, k6, dq_inter, dk_state, starts, dh, F, dq_off, dk_off, d_blk)


def _offdiag_rows(q6, k6, dA, F, cdt):
    B, H, N, ns, c, K = q6.shape
    qhat, kt = q6 * F.eqs, k6 * F.eks
    dq_rows = [jnp.zeros((B, H, N, c, K), _F32)]
    dk_off = jnp.zeros((B, H, N, ns, c, K), _F32)
    dA_t = jnp.swapaxes(dA, -1, -2) if jax.default_backend() == "cpu" else None  # XLA:CPU layout (§1)
    for I in range(1, ns):
        dA_I = dA[:, :, :, I * c:(I + 1) * c, :I * c]  # [B, H, N, c, I*c]
        dq_rows.append(_mm("bhnij,bhnjk->bhnik", dA_I, _khat(kt, F.rho, I), cdt))
        if dA_t is None:
            t = _mm("bhnij,bhnik->bhnjk", dA_I, qhat[:, :, :, I], cdt)
        else:
            t = _mm("bhnji,bhnik->bhnjk", dA_t[:, :, :, :I * c, I * c:(I + 1) * c], qhat[:, :, :, I], cdt)
        t = t.reshape(B, H, N, I, c, K)
        t = t * F.rho[:, :, :, I, :I, None, :]
        dk_off = dk_off + jnp.pad(t, ((0, 0),) * 3 + ((0, ns - I),) + ((0, 0),) * 2)
    dq_off = jnp.stack(dq_rows, axis=3) * F.eqs
    dk_off = dk_off * F.eks
    d_blk = jnp.stack([dA[:, :, :, I * c:(I + 1) * c, I * c:(I + 1) * c] for I in range(ns)], axis=3)
    return dq_off, dk_off, d_blk


def _qk_rest(qf, kf, q6, k6, dq_inter, dk_state, starts, dh, F, dq_off, dk_off, d_blk):
    B, H, N, C, K = qf.shape
    # Diagonal sub-blocks, strictly below the diagonal (the i == j terms are added last).
    if DIAG_BWD == "paired":
        dq_diag, dk_diag = _diag_grads_paired(q6, k6, F.b6, F.z6, d_blk)
    elif DIAG_BWD == "unrolled":
        dq_diag, dk_diag = _diag_grads_unrolled(q6, k6, F.al, d_blk)
    elif DIAG_BWD == "static":
        dq_diag, dk_diag = _diag_grads_static(q6, k6, F.al, d_blk)
    elif DIAG_BWD == "prod":
        dq_diag, dk_diag = _diag_grads_prod(q6, k6, F.al, d_blk)
    else:
        dq_diag, dk_diag = _diag_grads(q6, k6, F.b6, F.z6, d_blk)
    d_self = jnp.diagonal(d_blk, axis1=-2, axis2=-1)[..., None]  # [B, H, N, ns, c, 1]

    dq = dq_inter + (dq_off + dq_diag).reshape(B, H, N, C, K)
    dk_intra = (dk_off + dk_diag).reshape(B, H, N, C, K)
    # Gate gradient (chunk-local identity, see the module docstring).
    x = qf * dq - kf * dk_intra
    y = kf * dk_state
    carried = jnp.sum(dh * F.a[..., None] * starts, axis=-1)  # [B, H, N, K]
    dg = _cumsum_rows(x, "reverse") + _cumsum_rows(y, "exclusive") + carried[:, :, :, None, :]
    # At a zero gate dg is 0 (the limit g -> -inf; the identity gives 0 there only up to rounding).
    z = F.z6.reshape(B, H, N, C, K)
    dg = jnp.where(z != jnp.pad(z[:, :, :, :-1], ((0, 0),) * 3 + ((1, 0), (0, 0))), 0.0, dg)
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


def _forward_grouped(cfg, q, k, v, g, s0, doc):
    """``_forward`` over groups of ``cfg[3]`` chunks (``chunk_math.grouped_forward``; docs/design.md §1)."""
    return grouped_forward(functools.partial(_forward, cfg), cfg[3], q, k, v, g, s0, doc)


def _bwd_grouped(cfg, res, cts):
    """``_chunk_op_bwd`` over the same groups, in reverse (``chunk_math.grouped_backward``)."""
    return grouped_backward(functools.partial(_chunk_op_bwd, cfg), cfg[3], res, cts)


_chunk_op = custom_vjp_op(_forward_grouped, _bwd_grouped)


def _keep(res):
    if RES == "keepA":
        return (res[5],)
    return tuple(res[4:6]) if RES == "keep" else ()


def _rebuild(c, q, k, v, g, s, doc, first, kept):
    F, _ = _factors(g, doc, c, first)
    if RES == "keepA":
        (A,) = kept
        u = _mm("bhnck,bhncv->bhnkv", k.astype(_F32) * F.ek, v)
        starts = state_scan(F.a, u, s)[1]
        return q, k, v, doc, starts, A, F
    starts, A = kept
    return q, k, v, doc, starts, A, F


def _forward_tokens(cfg, q, k, v, g, s0, doc):
    return token_forward(functools.partial(_forward, cfg), cfg[3], cfg[4], q, k, v, g, s0, doc, keep=_keep)


def _bwd_tokens(cfg, res, cts):
    return token_backward(functools.partial(_forward, cfg), functools.partial(_chunk_op_bwd, cfg), cfg[3], cfg[4],
                          res, cts, rebuild=functools.partial(_rebuild, cfg[1]) if RES in ("keep", "keepA") else None)


_token_op = custom_vjp_op(_forward_tokens, _bwd_tokens)
LAYOUT = "tokens"
OFFDIAG = "bisect"
RES = "recompute"
ZCOND = 1
DIAG_BWD = "prod"
EB = True


def _to_chunks(x, n, C):
    B, T, H, D = x.shape
    return x.reshape(B, n, C, H, D).transpose(0, 3, 1, 2, 4)


def default_matmul_dtype(dtype):
    """Operand dtype of the intra-chunk matmuls for inputs of ``dtype``: the input dtype on accelerators (bf16
    tensor cores), float32 on CPU (where half-precision matmuls are no faster and cost accuracy)."""
    dtype = jnp.dtype(dtype)
    if jax.default_backend() == "cpu" or not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits > 32:
        return jnp.dtype(_F32)
    return dtype


def gla_chunk(q, k, v, g, *, scale, initial_state=None, segment_ids=None, chunk_size=64, matmul_dtype=None,
              group_chunks=None):
    """Two-level chunkwise GLA (chunks of ``chunk_size``, sub-chunks of 16), differentiable via a custom VJP.

    q, k, g: [B, T, H, K]; v: [B, T, H, V] (float32/bfloat16/float16); g <= 0 is the log forget gate;
    initial_state: [B, H, K, V] or None; segment_ids: [B, T] int or None (state reset at each document start).
    matmul_dtype: operand dtype of the intra-chunk matmuls (off-diagonal sub-chunk blocks, A v and their
    gradients), always with float32 accumulation; default ``default_matmul_dtype(input dtype)``. Gates, the
    diagonal sub-blocks and everything touching the state are float32.
    group_chunks: chunks per step of the loop over the sequence (0: all chunks at once); default
    ``default_group_chunks()`` (``CPU_GROUP_CHUNKS`` on CPU, 0 on accelerators).
    Returns (o [B, T, H, V] float32, final_state [B, H, K, V] float32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = int(chunk_size)
    c = min(SUB_CHUNK, C)
    if C % c:
        raise ValueError(f"chunk_size: expected a multiple of {SUB_CHUNK}, got {chunk_size!r}")
    n = max(1, math.ceil(T / C))
    pad = n * C - T
    in_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if jnp.finfo(in_dtype).bits > 32:
        in_dtype = jnp.dtype(_F32)
    q, k, v = q.astype(in_dtype), k.astype(in_dtype), v.astype(in_dtype)
    mdt = default_matmul_dtype(in_dtype) if matmul_dtype is None else jnp.dtype(matmul_dtype)
    g = g.astype(_F32)
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v, g = (jnp.pad(x, widths) for x in (q, k, v, g))
    s0 = jnp.zeros((B, H, K, V), _F32) if initial_state is None else initial_state.astype(_F32)
    doc = None
    if segment_ids is not None:
        doc = document_index(segment_ids)
        if pad:
            doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")
        doc = doc.reshape(B, n, C)
    G = default_group_chunks() if group_chunks is None else int(group_chunks)
    if G < 0:
        raise ValueError(f"group_chunks: expected an int >= 0, got {group_chunks!r}")
    cfg = (float(scale), c, mdt, G, C)
    if LAYOUT == "tokens":
        o, s_final = _token_op(cfg, q, k, v, g, s0, doc)
        return o[:, :T], s_final
    o, s_final = _chunk_op(cfg, _to_chunks(q, n, C), _to_chunks(k, n, C), _to_chunks(v, n, C), _to_chunks(g, n, C),
                           s0, doc)
    o = o.transpose(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]
    return o, s_final
