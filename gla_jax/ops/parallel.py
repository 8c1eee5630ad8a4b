"""Parallel (quadratic) GLA: every query against every earlier key, with the decay taken as a gate difference.

Memory is O(T^2 K) per batch and head; use it for checks and short sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gla_jax.ops.gates import finite_gates, zero_steps


@jax.custom_vjp
def _pairwise_gate_sums(g):
    """D[b, t, s] = sum_{s < r <= t} g_r = G_t - G_s (G the inclusive cumsum of g over time), for every pair.

    g: [B, T, H, K] float32 -> D [B, T, T, H, K] float32 (entries with s > t are meaningless; callers mask them).
    Autodiff through ``G_t - G_s`` would give dg as a reverse cumulative sum of terms that cancel (the s = t pairs
    contribute +x and -x); with very negative gates the true dg (~e^{-20} |q dq|) drowns in that cancellation. The
    custom backward sums only the pairs that contain r: dg_r = sum_{t >= r} sum_{s < r} dD[t, s].
    """
    G = jnp.cumsum(g, axis=1)
    return G[:, :, None] - G[:, None, :]


def _pairwise_fwd(g):
    return _pairwise_gate_sums(g), None


def _pairwise_bwd(_, dD):
    T = dD.shape[1]
    # [b, t, r]: sum_{s < r} dD[t, s], as a shifted cumsum (subtracting dD from an inclusive one would cancel).
    below = jnp.cumsum(jnp.pad(dD, ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))[:, :, :-1], axis=2)
    upper = jnp.triu(jnp.ones((T, T), dD.dtype))  # [r, t]: t >= r
    return (jnp.einsum("rt,btrhk->brhk", upper, below, precision=jax.lax.Precision.HIGHEST),)


_pairwise_gate_sums.defvjp(_pairwise_fwd, _pairwise_bwd)


def gla_parallel(q, k, v, g, *, scale, initial_state=None, segment_ids=None):
    """o_t = sum_{s<=t, same document} (q_t * exp(G_t - G_s)) . k_s v_s  (+ (q_t * exp(G_t)) S_0 for the first document).

    G is the inclusive cumulative sum of g (float32). The difference G_t - G_s <= 0 is formed before exp, so nothing
    overflows. Zero gates (g <= ``gates.ZERO_LOG_GATE``, −inf included) count as 0 in G and, through their own
    exact cumulative count Z, zero every decay that crosses them: exp((G_t - G_s) + (Z_t - Z_s)).
    Shapes as ``gla_recurrent``; returns (o [B, T, H, V] float32, final_state [B, H, K, V] float32).
    """
    f32 = jnp.float32
    B, T, H, K = q.shape
    q = q.astype(f32) * scale
    k, v = k.astype(f32), v.astype(f32)
    # Zero gates: the exact count of them, Z (multiples of -256), is added to every gate difference (gates.py).
    g, z = finite_gates(g), jnp.cumsum(zero_steps(g), axis=1)
    Z = jax.lax.stop_gradient(z[:, :, None] - z[:, None, :])  # [B, Tq, Ts, H, K]
    causal = jnp.tril(jnp.ones((T, T), bool))
    if segment_ids is None:
        same = jnp.broadcast_to(causal, (B, T, T))
        first_doc = jnp.ones((B, T), bool)
        last_doc = first_doc
    else:
        same = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
        first_doc = segment_ids == segment_ids[:, :1]
        last_doc = segment_ids == segment_ids[:, -1:]
    D = _pairwise_gate_sums(g) + Z  # [B, Tq, Ts, H, K]
    decay = jnp.exp(jnp.where(same[..., None, None], D, -jnp.inf))
    a = jnp.einsum("bthk,bshk,btshk->bhts", q, k, decay)
    o = jnp.einsum("bhts,bshv->bthv", a, v)
    # Final state: the last document's keys decayed to the end (G_T - G_s is the last row of D; exponents <= 0).
    kd = jnp.where(last_doc[..., None, None], k * jnp.exp(D[:, -1]), 0.0)
    s_final = jnp.einsum("bshk,bshv->bhkv", kd, v)
    if initial_state is not None:
        s0 = initial_state.astype(f32)
        G = jnp.cumsum(g, axis=1) + z
        qd = jnp.where(first_doc[..., None, None], q * jnp.exp(G), 0.0)
        o = o + jnp.einsum("bthk,bhkv->bthv", qd, s0)
        carry = jnp.all(first_doc, axis=1)[:, None, None, None]  # the first document runs to the end
        s_final = s_final + jnp.where(carry, jnp.exp(G[:, -1])[..., None] * s0, 0.0)
    return o, s_final
