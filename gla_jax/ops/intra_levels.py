"""The intra-chunk matrix of vector-gated GLA on three levels of blocks, and its gradients (docs/design.md §1).

Within a chunk of C rows (b the chunk-local cumulative gate, z the cumulative zero-gate steps, ``gates.py``):

    A_ij = sum_d q_id k_jd e^{(b_id - b_jd) + (z_id - z_jd)}       (j <= i)

The factor cannot be split as e^{b_i} e^{-b_j}: with strong gates (log α = -20 per step) one of the two overflows.
It can be split at any row m between j and i, e^{b_i - b_m} e^{b_m - b_j}, both exponents <= 0. The chunk is cut
into blocks on ``levels(C)`` (C -> 16 -> 4 rows, ``SUB_CHUNK`` then ``LEAF``); a level (s, c) covers, inside every
block of s rows, the pairs of rows whose sub-blocks of c rows differ (J < I), as matmuls:

    A_IJ = (q_I e^{b_I - r_I}) (k_J e^{e_J - b_J} e^{r_I - e_J})^T      r_I: b at I's first row, e_J: at J's last

one batched matmul per level, all row blocks I at once against the whole block (the J >= I products are masked
off). The pairs left, inside the 4-row leaf blocks, are 6 per leaf block plus the diagonal; there the factor is
the product of the per-step decays α_t = e^{g_t} (0 exactly at a zero gate) between j and i, no exponential at all
(at most 3 factors <= 1). Per row this costs 4 exponentials of K values (2 per level) and 1 for α, instead of one
per pair of rows: elementwise work is what bounds the chunk form on a CPU.

Layout: rows [..., C, K] (any leading axes); factors float32; matmuls in ``cdt`` (None: float32 at full
precision) with float32 accumulation.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from gla_jax.ops.chunk_math import mm

#: The smallest blocks: their pairs use products of the per-step decays instead of matmuls.
LEAF = 16

_F32 = jnp.float32


def levels(C: int, c: int) -> tuple[tuple[int, int], ...]:
    """The (block, sub-block) sizes of the matmul levels, coarse to fine: ((C, c), (c, LEAF)), without a level
    that has a single sub-block. C must be a multiple of c, and c of ``LEAF``."""
    out = []
    return ((C, c),) if C > c else ()


class LevelFactors(NamedTuple):
    """Gate factors of one level (s, c); nb = C // s blocks of ns = s // c sub-blocks, all exponents <= 0."""

    qf: object  # [..., nb, ns, c, K] e^{b - r_I}: from the sub-block's first row
    kf: object  # [..., nb, ns, c, K] e^{e_J - b}: to the sub-block's last row
    rho: object  # [..., nb, ns(I), ns(J), K] e^{r_I - e_J} (used for J < I only; clamped to <= 1)


def _split(x, s, c):
    """[..., C, K] -> [..., C // s, s // c, c, K] (a free reshape)."""
    C, K = x.shape[-2:]
    return x.reshape(x.shape[:-2] + (C // s, s // c, c, K))


def level_factors(b, z, s: int, c: int) -> LevelFactors:
    """The factors of level (s, c) from the chunk-local cumulative gates b and zero steps z [..., C, K] float32."""
    b5, z5 = _split(b, s, c), _split(z, s, c)
    r, rz = b5[..., :1, :], z5[..., :1, :]
    e, ez = b5[..., -1:, :], z5[..., -1:, :]
    qf = jnp.exp((b5 - r) + (z5 - rz))
    kf = jnp.exp((e - b5) + (ez - z5))
    gap = (r[..., :, None, 0, :] - e[..., None, :, 0, :]) + (rz[..., :, None, 0, :] - ez[..., None, :, 0, :])
    return LevelFactors(qf, kf, jnp.exp(jnp.minimum(gap, 0.0)))


@functools.lru_cache(maxsize=None)
def _lower_blocks(ns: int, c: int) -> np.ndarray:
    """[ns, c, ns * c] float32: 1 where the column's sub-block J is before the row's sub-block I."""
    m = np.kron(np.tril(np.ones((ns, ns), np.float32), -1), np.ones((c, c), np.float32))
    return m.reshape(ns, c, ns * c)


def _flat(x, n):
    """Merge all but the last ``n`` axes into one batch axis (XLA:CPU's batched matmuls want exactly one)."""
    return x.reshape((-1,) + x.shape[x.ndim - n:])


def _qhat_khat(q, k, F: LevelFactors, s, c, keys_major: bool):
    """qhat [X, c, K] (X = every (block, sub-block I) of every chunk) and the keys of the block seen from
    sub-block I: [X, K, s] with ``keys_major`` (the forward's right operand), else [X, s, K]. Both orientations
    keep every matmul of a level "row-major times row-major": XLA:CPU is several times slower on narrow (c-row)
    batched matmuls whose right operand is contracted along its minor axis."""
    qh = _split(q, s, c) * F.qf  # [..., nb, I, c, K]
    kt = _split(k, s, c) * F.kf  # [..., nb, J, c, K]
    if keys_major:
        khat = jnp.swapaxes(kt, -1, -2)[..., None, :, :, :] * F.rho[..., :, :, :, None]  # [..., nb, I, J, K, c]
        khat = jnp.swapaxes(khat, -3, -2)  # [..., nb, I, K, J, c]
        return _flat(qh, 2), khat.reshape((-1, khat.shape[-3], s))
    khat = kt[..., None, :, :, :] * F.rho[..., :, :, None, :]  # [..., nb, I, J, c, K]
    return _flat(qh, 2), khat.reshape((-1, s, khat.shape[-1]))


def level_matrix(q, k, F: LevelFactors, s: int, c: int, cdt=None):
    """Level (s, c)'s part of A: [..., nb, ns, c, s] float32, zero outside the pairs J < I of each block."""
    qh, khat = _qhat_khat(q, k, F, s, c, keys_major=True)
    P = mm("xik,xkj->xij", qh, khat, cdt).reshape(F.qf.shape[:-1] + (s,))
    return P * jnp.asarray(_lower_blocks(s // c, c))


def level_grads(q, k, F: LevelFactors, dP, s: int, c: int, cdt=None):
    """Gradients (dq, dk) [..., C, K] float32 through ``level_matrix`` given its cotangent dP [..., nb, ns, c, s]
    (only the J < I entries are read)."""
    ns = s // c
    qh, khat = _qhat_khat(q, k, F, s, c, keys_major=False)
    dP = dP * jnp.asarray(_lower_blocks(ns, c))
    dq = mm("xij,xjk->xik", _flat(dP, 2), khat, cdt).reshape(F.qf.shape) * F.qf
    # dk_j = kf_j sum_{I, i} dP[I, i, j] q_i e^{b_i - r_I} e^{r_I - e_J}: the queries seen from column block J.
    K = q.shape[-1]
    qhat = qh.reshape(F.qf.shape)[..., :, :, None, :] * F.rho[..., :, None, :, :]  # [..., nb, I, i, J, K]
    qhat = jnp.moveaxis(qhat, -2, -4).reshape((-1, s, K))  # [X', (I, i), K], X' = every (block, J)
    dPt = jnp.moveaxis(dP.reshape(dP.shape[:-1] + (ns, c)), (-2, -1), (-5, -4))  # [..., nb, J, j, I, i]
    dk = mm("xjy,xyk->xjk", dPt.reshape((-1, c, s)), qhat, cdt).reshape(F.kf.shape) * F.kf
    return dq.reshape(q.shape), dk.reshape(k.shape)


def _leaf_decays(b, z):
    """E[o] [..., C/LEAF, LEAF - o, K] for o = 1 .. LEAF-1: e^{(b_i - b_{i-o}) + (z_i - z_{i-o})} for the rows
    i >= o of each leaf block (exponents <= 0; clamped so rounding never makes one positive)."""
    b4, z4 = _leaf_view(b), _leaf_view(z)
    return {o: jnp.exp(jnp.minimum((b4[..., o:, :] - b4[..., :LEAF - o, :]) + (z4[..., o:, :] - z4[..., :LEAF - o, :]),
                                   0.0)) for o in range(1, LEAF)}


def _leaf_view(x):
    return x.reshape(x.shape[:-2] + (x.shape[-2] // LEAF, LEAF, x.shape[-1]))


def leaf_matrix(q, k, b, z):
    """The leaf blocks of A including their diagonal: [..., C/LEAF, LEAF, LEAF] float32 (0 above the diagonal).

    q, k: [..., C, K] float32; alpha: [..., C, K] e^{g} per step (0 at a zero gate)."""
    q4, k4 = _leaf_view(q), _leaf_view(k)
    E = _leaf_decays(b, z)
    ones = jnp.ones((q.shape[-1],), _F32)
    dot = lambda x: jnp.einsum("...d,d->...", x, ones, precision="highest")
    p = {0: dot(q4 * k4)}
    for o in range(1, LEAF):
        p[o] = dot(q4[..., o:, :] * k4[..., :LEAF - o, :] * E[o])  # p[o][t] = A[t + o, t]
    zero = jnp.zeros_like(p[0][..., 0])
    rows = [p[i - j][..., j] if j <= i else zero for i in range(LEAF) for j in range(LEAF)]
    return jnp.stack(rows, axis=-1).reshape(p[0].shape[:-1] + (LEAF, LEAF))


def leaf_grads(q, k, b, z, dD):
    """(dq, dk) [..., C, K] float32 through the strictly-lower entries of ``leaf_matrix`` given its cotangent dD
    [..., C/LEAF, LEAF, LEAF] (the diagonal, exponent 0, is left to the caller)."""
    q4, k4 = _leaf_view(q), _leaf_view(k)
    E = _leaf_decays(b, z)
    flat = dD.reshape(dD.shape[:-2] + (LEAF * LEAF,))
    dq, dk = jnp.zeros_like(q4), jnp.zeros_like(k4)
    for o in range(1, LEAF):
        w = flat[..., LEAF * o::LEAF + 1][..., :LEAF - o, None]  # w[t] = dD[t + o, t]
        pad = [(0, 0)] * (dq.ndim - 2)
        dq = dq + jnp.pad(w * k4[..., :LEAF - o, :] * E[o], pad + [(o, 0), (0, 0)])
        dk = dk + jnp.pad(w * q4[..., o:, :] * E[o], pad + [(0, o), (0, 0)])
    return dq.reshape(q.shape), dk.reshape(k.shape)


def embed_diagonal(P, M, s: int, c: int):
    """Level (s, c)'s part P [..., nb, ns, c, s] plus the finer blocks M [..., C/c, c, c] on its block diagonal:
    [..., nb, s, s]."""
    ns = s // c
    P6 = P.reshape(P.shape[:-1] + (ns, c))  # [..., nb, I, i, J, j]
    M5 = M.reshape(P.shape[:-3] + (ns, c, c))
    eye = jnp.asarray(np.eye(ns, dtype=np.float32))[:, None, :, None]
    out = P6 + M5[..., :, :, None, :] * eye
    return out.reshape(P.shape[:-3] + (s, s))


def diagonal_blocks(X, s: int, c: int):
    """X [..., nb, s, s] -> (X restricted to level (s, c): [..., nb, ns, c, s], its diagonal sub-blocks
    [..., nb * ns, c, c])."""
    ns = s // c
    diag = jnp.stack([X[..., I * c:(I + 1) * c, I * c:(I + 1) * c] for I in range(ns)], axis=-3)  # [..., nb, I, c, c]
    return X.reshape(X.shape[:-2] + (ns, c, s)), diag.reshape(X.shape[:-3] + (-1, c, c))


class Factors(NamedTuple):
    """All intra-chunk factors of a chunk: one ``LevelFactors`` per entry of ``levels`` and the per-step decays."""

    levels: tuple  # ((s, c), LevelFactors) per level, coarse to fine
    b: object  # [..., C, K] chunk-local cumulative finite gates
    z: object  # [..., C, K] chunk-local cumulative zero steps


def intra_factors(g, b, z, c: int) -> Factors:
    """Factors from the gates g [..., C, K] (float32, zero gates as they come) and their chunk-local cumulative
    sums b (finite gates) and z (zero steps)."""
    from gla_jax.ops.gates import finite_gates, zero_steps

    C = g.shape[-2]
    lv = tuple(((s, sub), level_factors(b, z, s, sub)) for s, sub in levels(C, c))
    return Factors(lv, b, z)


def intra_matrix(q, k, F: Factors, cdt=None):
    """A [..., C, C] float32, lower triangular including the diagonal (no document mask)."""
    M = leaf_matrix(q, k, F.b, F.z)  # [..., C/LEAF, LEAF, LEAF]
    for (s, c), lf in reversed(F.levels):
        M = embed_diagonal(level_matrix(q, k, lf, s, c, cdt), M, s, c)
        M = M.reshape(M.shape[:-3] + (-1, s, s))
    return M.reshape(q.shape[:-2] + (q.shape[-2], q.shape[-2]))


def intra_grads(q, k, F: Factors, dA, cdt=None):
    """(dq, dk, d_self) through ``intra_matrix`` given dA [..., C, C] (already causal- and document-masked):
    dq, dk [..., C, K] without the diagonal terms; d_self [..., C, 1] = dA_ii (the caller adds d_self k, d_self q)."""
    C = q.shape[-2]
    X = dA.reshape(dA.shape[:-2] + (1, C, C))
    dq, dk = jnp.zeros_like(q), jnp.zeros_like(k)
    for (s, c), lf in F.levels:
        dP, X = diagonal_blocks(X, s, c)
        gq, gk = level_grads(q, k, lf, dP, s, c, cdt)
        dq, dk = dq + gq, dk + gk
    X = X.reshape(X.shape[:-3] + (C // LEAF, LEAF, LEAF))
    gq, gk = leaf_grads(q, k, F.b, F.z, X)
    d_self = X.reshape(X.shape[:-2] + (LEAF * LEAF,))[..., ::LEAF + 1].reshape(q.shape[:-1] + (1,))
    return dq + gq, dk + gk, d_self
