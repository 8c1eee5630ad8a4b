"""Scalar-gate linear attention (one log decay per head and step): the RetNet / Mamba2 (SSD) form of GLA.

    S_t = exp(g_t) S_{t-1} + k_tᵀ v_t,   o_t = (scale q_t) S_t,    g_t <= 0 a scalar per (batch, step, head)

This is GLA with the gate broadcast over the key axis, but a scalar gate needs no secondary chunking (docs/design.md
§9): within a chunk of C steps, with b the chunk-local inclusive cumulative gate (float32) and S the state entering
the chunk,

    o_i = scale * ( m_in_i e^{b_i} q_i S  +  sum_{j<=i, same doc} (q_i · k_j) e^{b_i - b_j} v_j )
    S'  = keep e^{b_C} S  +  sum_j m_out_j e^{b_C - b_j} k_jᵀ v_j

The intra-chunk matrix is (Q Kᵀ) ⊙ D with the per-head decay matrix D_ij = e^{b_i - b_j} (j <= i): every exponent
is <= 0, so nothing overflows whatever the gates, and the whole chunk is one pair of matmuls. Packed documents use
the same constant masks as the vector-gate chunk form (``m_in``, ``m_out``, ``keep``, same-document pairs).

Zero gates (α = 0: g = -inf, or any g <= ``gates.ZERO_LOG_GATE`` = -104) are exact as in the vector-gate chunk form
(``gla_jax/ops/gates.py``, docs/design.md §2): they count as 0 in b and, separately, as exact multiples of -256 in a
second cumulative sum z, and every exponent above is (b_x - b_y) + (z_x - z_y): unchanged where no zero gate lies
between x and y, <= -256 (a factor of exactly 0) where one does. -inf never enters a sum, so nothing becomes NaN,
and small gates after a zero gate keep their float32 precision. dg is 0 at a zero gate (the limit g -> -inf).

Backward (``jax.custom_vjp``; residuals are the inputs, the cumulative gates and the chunk-start states
``[B, H, N, K, V]``, no per-step state): a reverse scan over chunks gives dH, the gradient of the state leaving each
chunk; dq, dk, dv are matmuls per chunk; the gate gradient is taken with respect to the cumulative gate b and
reverse-summed within the chunk (b_s = sum_{t<=s} g_t):

    dg_t = sum_{i>=t} [ q_i · dq_inter_i + sum_{j<i} W_ij - sum_{j>i} W_ji ]  +  sum_{j<t} k_j · dk_state_j
           + sum(dH ⊙ keep e^{b_C} S)
    W_ij = (do_i · v_j)(q_i · k_j) D_ij        (off-diagonal only: the diagonal terms cancel exactly)

Leaving out the diagonal keeps dg accurate at strong decays (log alpha = -20 per step), where the true gradient is
many orders of magnitude smaller than the individual q·dq terms.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from gla_jax.ops.checks import query_scale
from gla_jax.ops.chunk_math import custom_vjp_op, default_matmul_dtype, doc_masks, group_chunks_or_default
from gla_jax.ops.chunk_math import pad_to_chunks, token_backward, token_forward
from gla_jax.ops.chunk_math import state_scan
from gla_jax.ops.chunk_math import mm as _mm
from gla_jax.ops.gates import finite_gates, is_zero_gate, zero_steps

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST


def _tri(C, k=0, upper=False):
    m = np.triu(np.ones((C, C), np.float32), k) if upper else np.tril(np.ones((C, C), np.float32), k)
    return jnp.asarray(m)


def _cumsum_last(x, mode):
    """Cumulative sum over the last axis (the chunk axis C) as a matmul with a 0/1 triangle (fast on CPU).
    mode: "inclusive" (s <= t), "exclusive" (s < t) or "reverse" (s >= t)."""
    C = x.shape[-1]
    tri = {"inclusive": _tri(C), "exclusive": _tri(C, -1), "reverse": _tri(C, upper=True)}[mode]
    return jnp.einsum("ts,...s->...t", tri, x, precision=_HI, preferred_element_type=_F32)


def _decays(g, doc, first=None):
    """The masked decay factors of a chunk (every exponent <= 0 and finite, zero gates included):
    eq = e^{b} m_in, ek = e^{b_C - b} m_out [B, H, N, C], a = e^{b_C} keep [B, H, N], D [B, H, N, C, C] (causal,
    same doc), where every "b_x - b_y" stands for (b_x - b_y) + (z_x - z_y): b the inclusive cumulative sum of the
    finite gates (zero gates counted as 0), z that of the zero-gate steps (exact multiples of -256; module
    docstring)."""
    C = g.shape[-1]
    b = _cumsum_last(finite_gates(g), "inclusive")
    z = _cumsum_last(zero_steps(g), "inclusive")
    bC, zC = b[..., -1:], z[..., -1:]
    eq, ek, a = jnp.exp(b + z), jnp.exp((bC - b) + (zC - z)), jnp.exp(bC[..., 0] + zC[..., 0])
    causal = _tri(C) > 0
    gap = (b[..., :, None] - b[..., None, :]) + (z[..., :, None] - z[..., None, :])
    D = jnp.where(causal, jnp.exp(jnp.minimum(gap, 0.0)), 0.0)
    if doc is not None:
        m_in, m_out, keep, same = doc_masks(doc, first)
        eq, ek, a, D = eq * m_in, ek * m_out, a * keep, D * same
    return eq, ek, a, D


def _forward(cfg, q, k, v, g, s0, doc, first=None):
    scale, mdt = cfg[:2]
    eq, ek, a, D = _decays(g, doc, first)
    u = _mm("bhnck,bhncv->bhnkv", k.astype(_F32) * ek[..., None], v, _F32)
    s_final, starts = state_scan(a[..., None], u, s0)
    o = _mm("bhnck,bhnkv->bhncv", q.astype(_F32) * eq[..., None], starts, _F32)
    A = _mm("bhnik,bhnjk->bhnij", q, k, mdt) * D
    o = (o + _mm("bhnij,bhnjv->bhniv", A, v, mdt)) * scale
    return (o, s_final), (q, k, v, g, doc, first, starts)


def _scalar_op_bwd(cfg, res, cts):
    scale, mdt = cfg[:2]
    q, k, v, g, doc, first, starts = res
    do, ds_final = cts
    eq, ek, a, D = _decays(g, doc, first)
    do = do.astype(_F32) * scale
    qf, kf = q.astype(_F32), k.astype(_F32)

    # Reverse pass over chunks: dS_n = a_n dH_n + (q e^b)ᵀ do, with dH_n = dS_{n+1} (the state leaving chunk n).
    w = _mm("bhnck,bhncv->bhnkv", qf * eq[..., None], do, _F32)

    ds0, dh = state_scan(a[..., None], w, ds_final.astype(_F32), reverse=True)  # dh: [B, H, N, K, V]

    dq_inter = _mm("bhncv,bhnkv->bhnck", do, starts, _F32) * eq[..., None]
    dk_state = _mm("bhncv,bhnkv->bhnck", v, dh, _F32) * ek[..., None]
    dv = _mm("bhnck,bhnkv->bhncv", kf * ek[..., None], dh, _F32)

    P = _mm("bhnik,bhnjk->bhnij", q, k, mdt)  # q_i · k_j
    dPV = _mm("bhniv,bhnjv->bhnij", do, v, mdt)  # do_i · v_j
    dA = dPV * D  # gradient of P through A = P ⊙ D
    dq = dq_inter + _mm("bhnij,bhnjk->bhnik", dA, k, mdt)
    dk = dk_state + _mm("bhnij,bhnik->bhnjk", dA, q, mdt)
    dv = dv + _mm("bhnij,bhniv->bhnjv", P * D, do, mdt)

    # Gate gradient (module docstring): W off the diagonal, row sums minus column sums, reverse-summed.
    C = g.shape[-1]
    W = dPV * P * D * _tri(C, -1)
    db = jnp.sum(W, axis=-1) - jnp.sum(W, axis=-2) + jnp.sum(qf * dq_inter, axis=-1)
    carried = jnp.sum(dh * starts, axis=(-2, -1)) * a  # [B, H, N]
    dg = (_cumsum_last(db, "reverse") + _cumsum_last(jnp.sum(kf * dk_state, axis=-1), "exclusive")
          + carried[..., None])
    dg = jnp.where(is_zero_gate(g), 0.0, dg)  # at a zero gate: the limit g -> -inf (the identity gives ~0 there)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype), ds0, None


def _forward_tokens(cfg, q, k, v, g, s0, doc):
    """``_forward`` on token-major inputs (``chunk_math.token_forward``: the CPU group loop of the vector-gate
    chunk form when ``cfg[2]`` chunks per group apply, docs/design.md §1)."""
    return token_forward(functools.partial(_forward, cfg), cfg[2], cfg[3], q, k, v, g, s0, doc)


def _bwd_tokens(cfg, res, cts):
    """``_scalar_op_bwd`` on token-major cotangents (``chunk_math.token_backward``)."""
    return token_backward(functools.partial(_forward, cfg), functools.partial(_scalar_op_bwd, cfg), cfg[2], cfg[3],
                          res, cts)


_scalar_op = custom_vjp_op(_forward_tokens, _bwd_tokens)


def check_scalar_inputs(q, k, v, g, *, scale, initial_state, segment_ids, chunk_size):
    """Trace-time validation; returns (B, T, H, K, V). Each failure is a one-line ValueError naming the argument."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name}: expected an array, got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    if q.ndim != 4:
        raise ValueError(f"q: expected rank 4 ([B, T, H, K]), got shape {q.shape}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {q.shape} (same as q [B, T, H, K]), got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v: expected shape ({B}, {T}, {H}, V) to match q's [B, T, H], got {v.shape}")
    if g.shape != (B, T, H):
        raise ValueError(f"g: expected shape {(B, T, H)} ([B, T, H], one log decay per head and step), got {g.shape}")
    V = v.shape[3]
    if min(B, T, H, K, V) < 1:
        raise ValueError(f"q/v: every dimension must be >= 1, got q {q.shape}, v {v.shape}")
    if initial_state is not None:
        if getattr(initial_state, "shape", None) != (B, H, K, V):
            raise ValueError(f"initial_state: expected shape {(B, H, K, V)} ([B, H, K, V]), got "
                             f"{getattr(initial_state, 'shape', type(initial_state).__name__)}")
        if not jnp.issubdtype(initial_state.dtype, jnp.floating):
            raise ValueError(f"initial_state: expected a floating dtype, got {initial_state.dtype}")
    if segment_ids is not None:
        if getattr(segment_ids, "shape", None) != (B, T):
            raise ValueError(f"segment_ids: expected shape {(B, T)} ([B, T]), got "
                             f"{getattr(segment_ids, 'shape', type(segment_ids).__name__)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")
    if (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 16
            or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size: expected a power of two >= 16, got {chunk_size!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise ValueError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    return B, T, H, K, V


def gla_scalar(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
               chunk_size=64, group_chunks=None):
    """Chunkwise scalar-gate linear attention, differentiable through its own backward (custom VJP).

    Args:
      q, k: [B, T, H, K] queries and keys (float32/bfloat16/float16).
      v: [B, T, H, V] values.
      g: [B, T, H] log decays, one per head and step; must be <= 0 (not checked: values are unknown under jit).
        g = -inf (any g <= -104) is a zero gate, α = 0: the past is forgotten exactly as in the recurrence;
        outputs and gradients stay finite and dg there is 0.
      scale: query scale, default K ** -0.5 (Mamba2 uses 1.0).
      initial_state: [B, H, K, V] state before position 0 (it belongs to the first document).
      output_final_state: also return the state after position T-1.
      segment_ids: [B, T] integer document ids of packed rows (documents contiguous); the state resets at each
        document start.
      chunk_size: chunk length C (power of two >= 16); the intra-chunk matrices are [C, C] per head.
      group_chunks: chunks per step of the loop over the sequence (0: all chunks at once); default
        ``default_group_chunks()`` (8 on CPU, 0 on accelerators; docs/design.md §1).

    Returns:
      (o [B, T, H, V] in the inputs' result dtype, final_state [B, H, K, V] float32 or None).
    """
    B, T, H, K, V = check_scalar_inputs(q, k, v, g, scale=scale, initial_state=initial_state,
                                        segment_ids=segment_ids, chunk_size=chunk_size)
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    scale = query_scale(scale, K)
    in_dtype = out_dtype if jnp.finfo(out_dtype).bits <= 32 else jnp.dtype(_F32)
    C = int(chunk_size)
    G = group_chunks_or_default(group_chunks)
    (q, k, v, g), doc = pad_to_chunks([x.astype(in_dtype) for x in (q, k, v)] + [g.astype(_F32)], segment_ids, C, G)
    s0 = jnp.zeros((B, H, K, V), _F32) if initial_state is None else initial_state.astype(_F32)
    cfg = (scale, default_matmul_dtype(in_dtype), G, C)
    o, s_final = _scalar_op(cfg, q, k, v, g, s0, doc)
    o = o[:, :T]
    return o.astype(out_dtype), (s_final if output_final_state else None)


def gla_scalar_step(q, k, v, g, state, *, scale=None):
    """One recurrent step (generation): S = e^{g} S + kᵀ v, o = (scale q) S, in float32.

    q, k: [B, H, K]; v: [B, H, V]; g: [B, H] (<= 0); state: [B, H, K, V].
    Returns (o [B, H, V] in the inputs' result dtype, new state [B, H, K, V] float32).
    """
    if q.ndim != 3 or k.shape != q.shape:
        raise ValueError(f"q/k: expected equal shapes [B, H, K], got {q.shape} and {k.shape}")
    B, H, K = q.shape
    if v.ndim != 3 or v.shape[:2] != (B, H):
        raise ValueError(f"v: expected shape ({B}, {H}, V), got {v.shape}")
    if g.shape != (B, H):
        raise ValueError(f"g: expected shape {(B, H)} ([B, H]), got {g.shape}")
    if state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"state: expected shape {(B, H, K, v.shape[-1])} ([B, H, K, V]), got {state.shape}")
    scale = query_scale(scale, K)
    f = _F32
    s = state.astype(f) * jnp.exp(g.astype(f))[..., None, None] + k.astype(f)[..., :, None] * v.astype(f)[..., None, :]
    o = jnp.einsum("bhk,bhkv->bhv", q.astype(f) * scale, s, precision=_HI)
    return o.astype(jnp.result_type(q.dtype, k.dtype, v.dtype)), s
