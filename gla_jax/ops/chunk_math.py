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


def default_matmul_dtype(dtype):
    """Operand dtype of the intra-chunk matmuls of the chunk forms for inputs of ``dtype``: the input dtype on
    accelerators (bf16 tensor cores), float32 on CPU (where half-precision matmuls are no faster and cost accuracy)
    and for anything but a float of at most 32 bits."""
    dtype = jnp.dtype(dtype)
    if jax.default_backend() == "cpu" or not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits > 32:
        return jnp.dtype(_F32)
    return dtype


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


def group_count(G: int, N: int):
    """(groups, padded chunks) of the group loop over ``N`` chunks in groups of ``G``, or None when the chunks are
    done all at once (``G`` = 0 or ``N <= G``)."""
    if not G or N <= G:
        return None
    ng = -(-N // G)
    return ng, ng * G - N


def chunked(x, C: int):
    """[B, T, H, *r] token-major -> [B, H, T // C, C, *r] chunk-major (T a multiple of C)."""
    B, T, H = x.shape[:3]
    return jnp.moveaxis(x.reshape((B, T // C, C, H) + x.shape[3:]), 3, 1)


def unchunked(x):
    """[B, H, N, C, *r] chunk-major -> [B, N * C, H, *r] token-major."""
    x = jnp.moveaxis(x, 1, 3)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def group_chunks_or_default(group_chunks):
    """The chunks per step of the group loop for a ``group_chunks`` argument (None: ``default_group_chunks()``);
    ValueError naming it unless an int >= 0."""
    G = default_group_chunks() if group_chunks is None else int(group_chunks)
    if G < 0:
        raise ValueError(f"group_chunks: expected an int >= 0, got {group_chunks!r}")
    return G


def pad_to_chunks(xs, segment_ids, C: int, G: int = 0):
    """The chunk forms' inputs padded to whole chunks: (each [B, T, ...] array of ``xs`` with zeros appended to a
    multiple of ``C`` along T, or of ``G * C`` when the group loop of ``G`` chunks applies (``group_count``: the
    inputs are then padded once, not again per group), [B, N, C] running document numbers of ``segment_ids``
    [B, T] or None). Zero keys add nothing and zero log gates keep the state, so padding never changes a result;
    the padded rows continue the last document."""
    B, T = xs[0].shape[:2]
    pad = -T % C if T else C
    if group_count(G, (T + pad) // C) is not None:
        pad = -T % (G * C)
    if pad:
        xs = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in xs]
    doc = None
    if segment_ids is not None:
        doc = document_index(segment_ids)
        if pad:
            doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")
        doc = doc.reshape(B, -1, C)
    return xs, doc


def _groups(G, N, doc):
    """(groups of ``G`` among ``N`` chunks, [ng, B] the document entering each group or None) for the group loop;
    the inputs are already padded to whole groups (``pad_to_chunks(..., G)``)."""
    ng, pad = group_count(G, N)
    if pad:
        raise ValueError(f"the group loop needs whole groups of {G} chunks, got {N} chunks: pad with pad_to_chunks")
    return ng, None if doc is None else entering_documents(doc)[:, ::G].T  # the last document before each group


def _group_slice(i, G, C, xs, doc, entering):
    """Group ``i``'s chunks of the token-major inputs ``xs`` ([B, H, G, C, *r] each), its doc [B, G, C] and the
    document entering it (or None, None)."""
    L = G * C
    out = [chunked(lax.dynamic_slice_in_dim(x, i * L, L, axis=1), C) for x in xs]
    if doc is None:
        return out, None, None
    return out, lax.dynamic_slice_in_dim(doc, i * G, G, axis=1), entering[i]


def token_forward(forward, G: int, C: int, q, k, v, g, s0, doc, keep=None):
    """A chunk form's forward on token-major inputs (docs/design.md §1).

    q, k, g: [B, T, H, ...] and v [B, T, H, V] with T a multiple of C, of G·C when the group loop applies
    (``pad_to_chunks(..., G)``); doc [B, T // C, C] running document numbers
    or None; forward(q, k, v, g, s0, doc, first=None) -> ((o, s_final), res) the form's own forward on chunk-major
    inputs [B, H, N, C, ...]; keep(res) -> a tuple of the residual arrays worth storing per group (default none).
    Returns ((o [B, T, H, V], s_final), residuals).

    With ``group_count(G, N)`` groups (the CPU group loop) a ``lax.scan`` over groups of G chunks carries the state.
    Each step works on its group's inputs in chunk-major layout, sliced from the token-major inputs one step ahead
    and carried: a loop carry is a buffer of its own, where XLA:CPU would otherwise fuse the slice-and-transpose into
    every consumer. No full-size transposed copy is made; the residuals are the inputs, the state entering each
    group and ``keep``'s arrays stacked over the groups (``token_backward`` recomputes the rest). Otherwise
    everything is done at once and the form's residuals are kept."""
    B, T = q.shape[:2]
    N = T // C
    if group_count(G, N) is None:
        (o, s_final), res = forward(*(chunked(x, C) for x in (q, k, v, g)), s0, doc)
        return (unchunked(o), s_final), res
    ng, entering = _groups(G, N, doc)

    def step(carry, i):
        s, xs = carry
        _, doc_i, first = _group_slice(i, G, C, (), doc, entering)
        (o, s_next), res = forward(*xs, s, doc_i, first)
        nxt = _group_slice(jnp.minimum(i + 1, ng - 1), G, C, (q, k, v, g), None, None)[0]
        return (s_next, tuple(nxt)), (unchunked(o), s, () if keep is None else tuple(keep(res)))

    x0 = tuple(_group_slice(0, G, C, (q, k, v, g), None, None)[0])
    (s_final, _), (o, s_in, kept) = lax.scan(step, (s0, x0), jnp.arange(ng))
    o = jnp.moveaxis(o, 0, 1).reshape((B, T) + o.shape[3:])
    return (o, s_final), (q, k, v, g, doc, s_in, kept)


def token_backward(forward, backward, G: int, C: int, res, cts, rebuild=None):
    """The backward of :func:`token_forward`: ``backward(res, (do, ds)) -> (dq, dk, dv, dg, ds0, None)`` of the
    form on chunk-major arrays, with ``forward`` as in :func:`token_forward`. Returns the gradients token-major.

    With groups: a reverse ``lax.scan`` over the groups carrying the state gradient (and, sliced one step ahead,
    the next group's chunk-major inputs and output cotangent, as in ``token_forward``); each step rebuilds its
    group's residuals: ``rebuild(q, k, v, g, s, doc, first, kept)`` from the group's inputs, the state ``s`` that
    entered it and its arrays of ``token_forward``'s ``keep``, or (``rebuild`` None) by running ``forward`` again."""
    do, ds_final = cts
    B, T = do.shape[:2]
    N = T // C
    if group_count(G, N) is None:
        grads = backward(res, (chunked(do, C), ds_final))
        return tuple(unchunked(x) for x in grads[:4]) + tuple(grads[4:])
    q, k, v, g, doc, s_in, kept = res
    ng, entering = _groups(G, N, doc)

    def step(carry, x):
        ds, xs = carry
        i, s, kept_i = x
        *xs, do_i = xs
        _, doc_i, first = _group_slice(i, G, C, (), doc, entering)
        if rebuild is None:
            res_i = forward(*xs, s, doc_i, first)[1]
        else:
            res_i = rebuild(*xs, s, doc_i, first, kept_i)
        dq, dk, dv, dg, ds0, _ = backward(res_i, (do_i, ds))
        nxt = _group_slice(jnp.maximum(i - 1, 0), G, C, (q, k, v, g, do), None, None)[0]
        return (ds0, tuple(nxt)), tuple(unchunked(t) for t in (dq, dk, dv, dg))

    x0 = tuple(_group_slice(ng - 1, G, C, (q, k, v, g, do), None, None)[0])
    (ds0, _), grads = lax.scan(step, (ds_final.astype(jnp.float32), x0), (jnp.arange(ng), s_in, kept), reverse=True)
    dq, dk, dv, dg = (jnp.moveaxis(x, 0, 1).reshape((B, T) + x.shape[3:]) for x in grads)
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
