"""In-kernel building blocks shared by the Mosaic TPU GLA kernels (plain functions over values and refs).

Everything here keeps to operations Mosaic lowers on every TPU generation: 2-D values whose shapes are whole
(8, 128) vector tiles, static sublane-aligned row slices, lane/sublane reductions, ``broadcasted_iota`` masks,
2-D transposes of [128k, 128m] values, and ``dot_general`` in the NN and NT forms. Rows and columns of a small
block are picked out by masked reductions rather than by single-row loads or reshapes, and no value changes its
lane dimension by a reshape (Mosaic's layout passes, which would reject that, run only on a TPU).

Gates come as two [C, K] float32 refs: g, the chunk-local cumulative sum of the finite gates, and z, that of the
zero-gate steps (``gla_jax.ops.gates``: exact multiples of −256). Every exponent is (g_x − g_y) + (z_x − z_y)
(``gap``): the plain gate difference where no zero gate (α = 0) lies between x and y, <= −256 (a factor of
exactly 0) where one does.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def dot(a, b, *, dt=None, trans_b=False):
    """[M, K] x [K, N] (or, with ``trans_b``, [M, K] x [N, K]ᵀ) -> float32 on the MXU. Operands are cast to ``dt``
    when given; float32 operands multiply at full float32 precision (``Precision.HIGHEST``)."""
    if dt is not None:
        a, b = a.astype(dt), b.astype(dt)
    precision = lax.Precision.HIGHEST if (a.dtype == F32 or b.dtype == F32) else None
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def gap(g_x, z_x, g_y, z_y):
    """The exponent between positions x (later) and y: (g_x - g_y) + (z_x - z_y), broadcasting."""
    return (g_x - g_y) + (z_x - z_y)


def row(x, j):
    """Row j (traced) of a small 2-D value as [1, N], by a masked sublane sum."""
    return jnp.sum(jnp.where(iota(x.shape, 0) == j, x, 0.0), axis=0, keepdims=True)


def col(x, j):
    """Column j (traced) of a 2-D value as [M, 1], by a masked lane sum."""
    return jnp.sum(jnp.where(iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


def intra_attention(q_ref, k_ref, g_ref, z_ref, out_ref, *, c, dt):
    """out_ref [C, C] float32 <- A with A[i, j] = Σ_d q_id k_jd e^{g_id - g_jd} for j <= i, 0 above the diagonal
    (no scale, no document mask).

    q_ref, k_ref: [C, K] refs (``dt``); g_ref, z_ref: [C, K] float32 chunk-local cumulative gates and zero-gate
    steps (both non-increasing down the chunk). One sub-chunk I of c rows at a time (a static loop):
      * columns before I: one MXU product [c, K] x [K, C] relative to r = g at I's first row,
        (q_I ⊙ e^{g_I - r}) (k ⊙ e^{r - g})ᵀ with both exponents <= 0 (rows of I have g <= r, earlier rows g >= r);
        columns at or after I are zeroed in the right operand;
      * the c x c diagonal block elementwise in float32 log space, one column j per step (exponent g_i - g_j <= 0
        on the kept entries i >= j, clamped to <= 0 elsewhere so nothing overflows before the mask).
    """
    C = g_ref.shape[0]
    rows_all = iota((C, 1), 0)
    sub_rows = iota((c, C), 0)
    cols = iota((c, C), 1)
    for I in range(C // c):
        s0 = I * c
        q_i = q_ref[s0:s0 + c, :].astype(F32)
        k_i = k_ref[s0:s0 + c, :].astype(F32)
        g_i, z_i = g_ref[s0:s0 + c, :], z_ref[s0:s0 + c, :]
        if I:
            r, rz = g_ref[s0:s0 + 1, :], z_ref[s0:s0 + 1, :]
            k_before = jnp.where(rows_all < s0, k_ref[...].astype(F32)
                                 * jnp.exp(jnp.minimum(gap(r, rz, g_ref[...], z_ref[...]), 0.0)), 0.0)
            a = dot(q_i * jnp.exp(gap(g_i, z_i, r, rz)), k_before, dt=dt, trans_b=True)
        else:
            a = jnp.zeros((c, C), F32)

        def column(j, a, q_i=q_i, k_i=k_i, g_i=g_i, z_i=z_i, s0=s0):
            e = jnp.exp(jnp.minimum(gap(g_i, z_i, row(g_i, j), row(z_i, j)), 0.0))
            a_j = jnp.sum(q_i * row(k_i, j) * e, axis=1, keepdims=True)  # [c, 1]
            return jnp.where((cols == s0 + j) & (sub_rows >= j), a + a_j, a)

        out_ref[s0:s0 + c, :] = lax.fori_loop(0, c, column, a)


def sub_chunks(w, x_ref, g_ref, z_ref, c):
    """The sub-chunks of ``gated_past``/``gated_future``: (s0, g, z [c, K] rows s0:s0+c of g_ref/z_ref, x the same
    rows of x_ref as float32, the rows of w [c, C]) for s0 = 0, c, 2c, ... < C (a Python loop, unrolled)."""
    for s0 in range(0, g_ref.shape[0], c):
        yield (s0, g_ref[s0:s0 + c, :], z_ref[s0:s0 + c, :], x_ref[s0:s0 + c, :].astype(F32), w[s0:s0 + c, :])


def gated_past(w, x_ref, g_ref, z_ref, out_ref, *, c):
    """out_ref [C, K] float32 <- Σ_{j <= i} w[i, j] x_j ⊙ e^{g_i - g_j} (dq's intra-chunk part with w = scale dA).

    w: [C, C] float32 value, zero above the diagonal; x_ref: [C, K] ref; g_ref, z_ref as in ``intra_attention``. Off the
    diagonal one float32 MXU product per sub-chunk relative to r = g at its first row; the diagonal block
    elementwise, one column of w per step."""
    rows_all = iota((g_ref.shape[0], 1), 0)
    for s0, g_i, z_i, x_i, w_i in sub_chunks(w, x_ref, g_ref, z_ref, c):
        if s0:
            r, rz = g_ref[s0:s0 + 1, :], z_ref[s0:s0 + 1, :]
            x_before = jnp.where(rows_all < s0, x_ref[...].astype(F32)
                                 * jnp.exp(jnp.minimum(gap(r, rz, g_ref[...], z_ref[...]), 0.0)), 0.0)
            acc = jnp.exp(gap(g_i, z_i, r, rz)) * dot(w_i, x_before)
        else:
            acc = jnp.zeros(g_i.shape, F32)

        def column(j, acc, g_i=g_i, z_i=z_i, x_i=x_i, w_i=w_i, s0=s0):
            e = jnp.exp(jnp.minimum(gap(g_i, z_i, row(g_i, j), row(z_i, j)), 0.0))
            return acc + col(w_i, s0 + j) * row(x_i, j) * e

        out_ref[s0:s0 + c, :] = lax.fori_loop(0, c, column, acc)


def gated_future(wt, x_ref, g_ref, z_ref, out_ref, *, c):
    """out_ref [C, K] float32 <- Σ_{i >= j} wt[j, i] x_i ⊙ e^{g_i - g_j} (dk's intra-chunk part with wt = scale dAᵀ).

    wt: [C, C] float32 value, zero below the diagonal. Off the diagonal one float32 MXU product per sub-chunk J
    relative to r = g at J's last row (later rows have g <= r, J's rows g >= r); the diagonal block elementwise."""
    C = g_ref.shape[0]
    rows_all = iota((C, 1), 0)
    for s0, g_j, z_j, x_j, w_j in sub_chunks(wt, x_ref, g_ref, z_ref, c):
        if s0 + c < C:
            r, rz = g_ref[s0 + c - 1:s0 + c, :], z_ref[s0 + c - 1:s0 + c, :]
            x_after = jnp.where(rows_all >= s0 + c, x_ref[...].astype(F32)
                                * jnp.exp(jnp.minimum(gap(g_ref[...], z_ref[...], r, rz), 0.0)), 0.0)
            acc = jnp.exp(gap(r, rz, g_j, z_j)) * dot(w_j, x_after)
        else:
            acc = jnp.zeros(g_j.shape, F32)

        def column(t, acc, g_j=g_j, z_j=z_j, x_j=x_j, w_j=w_j, s0=s0):
            e = jnp.exp(jnp.minimum(gap(row(g_j, t), row(z_j, t), g_j, z_j), 0.0))
            return acc + col(w_j, s0 + t) * row(x_j, t) * e

        out_ref[s0:s0 + c, :] = lax.fori_loop(0, c, column, acc)


def doc_masks(relc_ref, relr_ref, C):
    """Document masks of a chunk from the packed ids (``chunk_gla.document_codes``): relc [C, 1] and relr [1, C]
    hold 2 rel + start, rel = document starts from the chunk start up to and including the position, start = 1 at
    a document's first position. Returns (same [C, C]: same document, first [C, 1]: rel == 0 (saw the incoming
    state), last [C, 1]: in the chunk's last document (reaches the outgoing state), start [C, 1] bool)."""
    code = relc_ref[...]
    rel = code >> 1
    rel_row = relr_ref[...] >> 1
    rel_last = rel[C - 1:C, :]
    return rel == rel_row, rel == 0, rel == rel_last, (code & 1) == 1
