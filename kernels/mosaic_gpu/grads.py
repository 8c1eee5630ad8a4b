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

from gla_jax.ops import chunk as xla_chunk  # shared two-level building blocks (jax-only module)
from gla_jax.ops.chunk_math import mm

F32 = jnp.float32


def qkg_grads(q, k, v, do, F, same, starts, dh, *, scale: float, c: int, cdt):
    """(dq, dk, dg) [B, H, N, C, K] float32.

    q, k: [B, H, N, C, K]; v, do: [B, H, N, C, V] (any float dtype); F: ``gla_jax.ops.chunk._Factors`` of the
    gates (masks folded in); same: [B, 1, N, C, C] float32 same-document mask or None; starts: chunk-start
    states and dh: gradients of the states leaving each chunk, both [B, H, N, K, V]; cdt: matmul operand dtype.
    """
    do = do.astype(F32) * scale
    starts, dh = starts.astype(F32), dh.astype(F32)
    dq_inter = mm("bhncv,bhnkv->bhnck", do, starts, cdt) * F.eq
    dk_state = mm("bhncv,bhnkv->bhnck", v, dh, cdt) * F.ek
    return xla_chunk.qk_gate_grads(q.astype(F32), k.astype(F32), do, v, same, dq_inter, dk_state, starts, dh, F, c=c,
                                   cdt=cdt)
