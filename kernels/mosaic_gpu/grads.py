"""The query, key and gate gradients of chunkwise GLA in plain jnp (float32), around the Mosaic GPU kernels.

The backward's sequential part (the state-gradient pass) and dv run as Mosaic GPU kernels (``states.py``,
``products.py``); dq, dk and dg are still XLA here, with the same two-level structure as the pure-JAX chunk
operator (``gla_jax.ops.chunk``, whose building blocks this reuses: sub-chunks of 16, off-diagonal sub-chunk
pairs as matmuls, diagonal 16x16 blocks elementwise in float32 log space, every exponent <= 0). ``chunk_gla`` runs
these matmuls with float32 operands: with bf16 operands dg's error against the float64 recurrence is ~3e-3 (the
terms of q ⊙ dq - k ⊙ dk cancel), with float32 ~1e-3. The gate gradient is the per-chunk form of the reverse-cumulative-sum identity
(docs/design.md §2): nothing is summed across chunks except through dH, so rounding does not grow with T.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gla_jax.ops import chunk as xla_chunk  # shared two-level building blocks (jax-only module)

F32 = jnp.float32


def qkg_grads(q, k, v, do, F, same, starts, dh, *, scale: float, c: int, cdt):
    """(dq, dk, dg) [B, H, N, C, K] float32.

    q, k: [B, H, N, C, K]; v, do: [B, H, N, C, V] (any float dtype); F: ``gla_jax.ops.chunk._Factors`` of the
    floored gates (masks folded in); same: [B, 1, N, C, C] float32 same-document mask or None; starts: chunk-start
    states and dh: gradients of the states leaving each chunk, both [B, H, N, K, V]; cdt: matmul operand dtype.
    """
    mm = xla_chunk._mm
    B, H, N, C, K = q.shape
    ns = C // c
    do = do.astype(F32) * scale
    qf, kf = q.astype(F32), k.astype(F32)
    q6, k6 = qf.reshape(F.b6.shape), kf.reshape(F.b6.shape)
    starts, dh = starts.astype(F32), dh.astype(F32)

    dq_inter = mm("bhncv,bhnkv->bhnck", do, starts, cdt) * F.eq
    dk_state = mm("bhncv,bhnkv->bhnck", v, dh, cdt) * F.ek

    causal = jnp.asarray(np.tril(np.ones((C, C), np.float32)))
    dA = mm("bhniv,bhnjv->bhnij", do, v, cdt) * (causal if same is None else causal * same)
    qhat, kt = q6 * F.eqs, k6 * F.eks
    dq_rows = [jnp.zeros((B, H, N, c, K), F32)]
    dk_off = jnp.zeros((B, H, N, ns, c, K), F32)
    for I in range(1, ns):
        dA_I = dA[:, :, :, I * c:(I + 1) * c, :I * c]
        dq_rows.append(mm("bhnij,bhnjk->bhnik", dA_I, xla_chunk._khat(kt, F.rho, I), cdt))
        t = mm("bhnij,bhnik->bhnjk", dA_I, qhat[:, :, :, I], cdt).reshape(B, H, N, I, c, K)
        t = t * F.rho[:, :, :, I, :I, None, :]
        dk_off = dk_off + jnp.pad(t, ((0, 0),) * 3 + ((0, ns - I),) + ((0, 0),) * 2)
    dq_off = jnp.stack(dq_rows, axis=3) * F.eqs
    dk_off = dk_off * F.eks
    d_blk = jnp.stack([dA[:, :, :, I * c:(I + 1) * c, I * c:(I + 1) * c] for I in range(ns)], axis=3)
    dq_diag, dk_diag = xla_chunk._diag_grads(q6, k6, F.b6, F.z6, d_blk)
    d_self = jnp.diagonal(d_blk, axis1=-2, axis2=-1)[..., None]

    dq = dq_inter + (dq_off + dq_diag).reshape(B, H, N, C, K)
    dk_intra = (dk_off + dk_diag).reshape(B, H, N, C, K)
    # dg: reverse cumsum of q dq - k dk inside the chunk, the state part, and the carried-state edge term.
    x = qf * dq - kf * dk_intra
    y = kf * dk_state
    carried = jnp.sum(dh * F.a[..., None] * starts, axis=-1)
    dg = xla_chunk._cumsum_rows(x, "reverse") + xla_chunk._cumsum_rows(y, "exclusive") + carried[:, :, :, None, :]
    dq = dq + (d_self * k6).reshape(B, H, N, C, K)
    dk = dk_intra + dk_state + (d_self * q6).reshape(B, H, N, C, K)
    return dq, dk, dg
