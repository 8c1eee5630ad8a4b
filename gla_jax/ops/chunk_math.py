"""Pure-jnp pieces every chunkwise GLA backend needs: the sub-chunk size, chunk-local cumulative sums of the gates
(and the reverse sums of dg), and the document encoding of packed rows (docs/design.md §1, §7).

A jax-only leaf module: the kernel packages import it without pulling in flax, optax or the layers.

Document encoding. ``document_index(segment_ids)`` numbers the documents of each row 0, 1, 2, ... (position 0 is
always in document 0: the initial state belongs to it). ``chunk_relative(doc, C)`` re-bases that number at every
chunk: ``rel[t] = doc[t] - doc[entering]``, the number of document starts between the state entering t's chunk and t.
Inside a chunk two positions see each other only when their numbers agree, the entering state reaches only
``rel == 0``, and the state survives the chunk only when its last position has ``rel == 0``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gla_jax.ops.gates import finite_gates, zero_steps
from gla_jax.ops.segments import segment_starts

#: The sub-chunk (secondary chunk) length: off-diagonal sub-blocks are matmuls, diagonal ones elementwise float32.
SUB_CHUNK = 16

_F32 = jnp.float32
_MODES = ("inclusive", "exclusive", "reverse")


@functools.lru_cache(maxsize=None)
def triangle(C: int, mode: str = "inclusive") -> np.ndarray:
    """[C, C] float32 0/1 matrix M[t, s] selecting s <= t ("inclusive"), s < t ("exclusive") or s >= t ("reverse")."""
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    ones = np.ones((C, C), np.float32)
    out = {"inclusive": np.tril(ones), "exclusive": np.tril(ones, -1), "reverse": np.triu(ones)}[mode]
    out.setflags(write=False)
    return out


def mm(spec: str, a, b, dtype=None):
    """``jnp.einsum(spec, a, b)`` with float32 accumulation; operands cast to ``dtype`` (float32 when None, then at
    full precision). Returns float32."""
    if dtype is None or dtype == _F32:
        return jnp.einsum(spec, a.astype(_F32), b.astype(_F32), precision=lax.Precision.HIGHEST,
                          preferred_element_type=_F32)
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=_F32)


def state_scan(a, u, s0, reverse: bool = False):
    """The chunk-level recurrence S_{n+1} = a_n ⊙ S_n + u_n over the chunk axis 2 (backwards with ``reverse``: the
    state gradients dS_n = a_n ⊙ dS_{n+1} + u_n).

    a: [B, H, N, K] per-key decays of each chunk ([B, H, N, 1] for one per head); u: [B, H, N, K, V]; s0: [B, H, K, V]
    the state entering the first chunk (the last one with ``reverse``). Returns (the state leaving the last chunk,
    [B, H, N, K, V] the state entering each chunk)."""

    def step(s, x):
        a_n, u_n = x
        return a_n[..., None] * s + u_n, s

    s_end, entering = lax.scan(step, s0, (jnp.moveaxis(a, 2, 0), jnp.moveaxis(u, 2, 0)), reverse=reverse)
    return s_end, jnp.moveaxis(entering, 0, 2)


def custom_vjp_op(forward, backward):
    """``op(cfg, *arrays) -> outputs`` with a hand-written backward, the form of the pure-JAX chunk operators.

    forward(cfg, *arrays) -> (outputs, residuals); backward(cfg, residuals, output cotangents) -> one cotangent per
    array. ``cfg`` is static (hashable)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def op(cfg, *arrays):
        return forward(cfg, *arrays)[0]

    op.defvjp(forward, backward)
    return op


#: Chunks per step of the group loop on CPU (8 x 64 = 512 positions: every intermediate of a step stays within a
#: few MiB, so the many elementwise passes run from cache instead of memory). Measured side by side at T = 8192
#: (B=1, H=4, K=V=64, float32, loaded 2-core CPU): forward 1.4-1.5x, fwd+bwd 1.2x faster than all chunks at once;
#: 4..16 are within noise of each other, 32 loses most of the gain. Accelerators take every chunk at once (the loop
#: would only serialise their parallel work). Used by the vector-gate (``chunk.py``) and scalar-gate (``scalar.py``)
#: chunk forms.
CPU_GROUP_CHUNKS = 8


def default_group_chunks():
    """Chunks per step of the group loop: ``CPU_GROUP_CHUNKS`` on CPU, 0 (all at once) elsewhere."""
    return CPU_GROUP_CHUNKS if jax.default_backend() == "cpu" else 0


def to_groups(x, ng, pad, axis=2):
    """[B, H, N, ...] -> [ng, B, H, G, ...] for the group loop (``pad`` zero chunks appended on ``axis``: zero q, k,
    v and log gates change nothing, docs/design.md §1)."""
    x = jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
    return jnp.moveaxis(x.reshape(x.shape[:axis] + (ng, -1) + x.shape[axis + 1:]), axis, 0)


def from_groups(x, N):
    """[ng, B, H, G, ...] -> [B, H, N, ...]."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])[:, :, :N]


def group_count(G: int, N: int):
    """(groups, padded chunks) of the group loop over ``N`` chunks in groups of ``G``, or None when the chunks are
    done all at once (``G`` = 0 or ``N <= G``)."""
    if not G or N <= G:
        return None
    ng = -(-N // G)
    return ng, ng * G - N


def grouped_forward(forward, G: int, q, k, v, g, s0, doc):
    """The CPU group loop of a chunk form's forward (docs/design.md §1): ``forward`` over groups of ``G`` chunks in a
    ``lax.scan`` carrying the state, so each step's working set stays cache-sized.

    forward(q, k, v, g, s0, doc, first=None) -> ((o, s_final), res): the form's own forward on chunked inputs
    ``[B, H, N', ...]``; ``doc`` [B, N', C] document index or None; ``first`` [B] the document entering the first
    chunk (the last one of the chunk before). Returns the same with ``res`` stacked over groups."""
    B, H, N = q.shape[:3]
    grouping = group_count(G, N)
    if grouping is None:
        return forward(q, k, v, g, s0, doc)
    ng, pad = grouping
    xs = [to_groups(x, ng, pad) for x in (q, k, v, g)]
    if doc is None:
        xs += [None, None]
    else:  # the document entering each group's first chunk: the last one of the chunk before
        entering = entering_documents(doc)  # [B, N]
        doc = jnp.pad(doc, ((0, 0), (0, pad), (0, 0)), mode="edge")
        xs += [jnp.moveaxis(doc.reshape(B, ng, -1, doc.shape[-1]), 1, 0), entering[:, ::G].T]

    def step(s, x):
        (o, s_next), res = forward(*x[:4], s, *x[4:])
        return s_next, (o, res)

    s_final, (o, res) = lax.scan(step, s0, tuple(xs))
    return (from_groups(o, N), s_final), res


def grouped_backward(backward, G: int, res, cts):
    """The reverse of :func:`grouped_forward`: ``backward(res, (do, ds)) -> (dq, dk, dv, dg, ds0, None)`` group by
    group in a reverse ``lax.scan`` carrying the state gradient; ``res`` as ``grouped_forward`` returned it."""
    do, ds_final = cts
    grouping = group_count(G, do.shape[2])
    if grouping is None:
        return backward(res, cts)
    ng, pad = grouping

    def step(ds, x):
        res_g, do_g = x
        dq, dk, dv, dg, ds0, _ = backward(res_g, (do_g, ds))
        return ds0, (dq, dk, dv, dg)

    ds0, grads = lax.scan(step, ds_final.astype(jnp.float32), (res, to_groups(do, ng, pad)), reverse=True)
    dq, dk, dv, dg = (from_groups(x, do.shape[2]) for x in grads)
    return dq, dk, dv, dg, ds0, None


def cumsum_rows(x, mode: str = "inclusive", same=None):
    """Cumulative sum over the row axis (-2) of x [..., C, D] as one float32 matmul with a 0/1 triangle.

    mode: "inclusive" (Σ_{s<=t}), "exclusive" (Σ_{s<t}) or "reverse" (Σ_{s>=t}: dg's chunk-local identity).
    same: optional [..., C, C] 0/1 mask (rows t and s in the same document) multiplied into the triangle.
    A matmul rather than ``jnp.cumsum``: XLA's CPU cumsum is slow, and the sum never leaves the chunk. On CPU the
    triangle is broadcast over the leading axes so that the sum is one batched ``[C, C]·[C, D]`` matmul in the
    layout XLA:CPU runs fastest (an unbatched triangle makes it transpose x around the dot; measured side by side
    1.05-1.1x faster fwd+bwd at T = 8192, docs/design.md §1); accelerators keep the unbatched form (no broadcast
    copy). Returns float32 [..., C, D].
    """
    C = x.shape[-2]
    tri = jnp.asarray(triangle(C, mode))
    hi = lax.Precision.HIGHEST
    x = x.astype(_F32)
    if jax.default_backend() == "cpu":
        lead = x.shape[:-2]
        m = tri if same is None else tri * same.astype(_F32)
        m = jnp.broadcast_to(m, lead + (C, C)).reshape((-1, C, C))
        out = jnp.einsum("mts,msd->mtd", m, x.reshape((-1,) + x.shape[-2:]), precision=hi,
                         preferred_element_type=_F32)
        return out.reshape(x.shape)
    if same is None:
        return jnp.einsum("ts,...sd->...td", tri, x, precision=hi, preferred_element_type=_F32)
    return jnp.einsum("...ts,...sd->...td", tri * same.astype(_F32), x, precision=hi, preferred_element_type=_F32)


def chunk_cumsum(g, chunk_size: int):
    """g [B, T, H, K] (T a multiple of ``chunk_size``) -> (gc, zc) float32 [B, T, H, K]: inclusive cumulative sums
    restarted at every chunk start of the finite gates (zero gates counted as 0) and of the zero-gate steps (exact
    multiples of ``gates.ZERO_GATE_STEP``); every decay exponent is (gc_x - gc_y) + (zc_x - zc_y) (docs/design.md §2)."""
    B, T, H, K = g.shape
    rows = lambda x: cumsum_rows(x.reshape(B, T // chunk_size, chunk_size, H * K)).reshape(B, T, H, K)
    return rows(finite_gates(g)), rows(zero_steps(g))  # a free reshape: rows are axis -2


def document_index(segment_ids):
    """[B, T] integer document ids -> [B, T] int32 running document number of each position (0 at position 0)."""
    return jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)


def entering_documents(doc, first=None):
    """[B, N, C] running document numbers -> [B, N] the document of the state entering each chunk: the last one of
    the chunk before; for the first chunk ``first`` [B] (default: the document of its first row)."""
    first = doc[:, 0, 0] if first is None else first
    return jnp.concatenate([first[:, None], doc[:, :-1, -1]], axis=1)


def doc_masks(doc, first=None):
    """From running document numbers ``doc`` [B, N, C] (non-decreasing): float32 masks broadcastable to
    [B, H, N, ...]: m_in [B, 1, N, C] (row in the entering state's document), m_out [B, 1, N, C] (row in the chunk's
    last document, the one the leaving state carries), keep [B, 1, N] (no document starts in the chunk: the entering
    state survives it), same [B, 1, N, C, C] (rows i and j in the same document). ``first``: as in
    :func:`entering_documents`."""
    last = doc[:, :, -1]
    entering = entering_documents(doc, first)
    m_in = (doc == entering[..., None]).astype(jnp.float32)[:, None]
    m_out = (doc == last[..., None]).astype(jnp.float32)[:, None]
    keep = (last == entering).astype(jnp.float32)[:, None]
    same = (doc[..., :, None] == doc[..., None, :]).astype(jnp.float32)[:, None]
    return m_in, m_out, keep, same


def chunk_relative(doc, chunk_size: int):
    """[B, T] running document numbers (T a multiple of ``chunk_size``) -> [B, T] int32 document starts between the
    state entering each position's chunk and the position (0 = the entering state's document)."""
    B, T = doc.shape
    d = doc.astype(jnp.int32).reshape(B, T // chunk_size, chunk_size)
    return (d - entering_documents(d)[..., None]).reshape(B, T)
