"""Parallel (quadratic) GLA: every query against every earlier key, with the decay taken as a gate difference.

Memory is O(T^2 K) per batch and head; use it for checks and short sequences.
"""

from __future__ import annotations

import jax.numpy as jnp


def gla_parallel(q, k, v, g, *, scale, initial_state=None, segment_ids=None):
    """o_t = sum_{s<=t, same document} (q_t * exp(G_t - G_s)) . k_s v_s  (+ (q_t * exp(G_t)) S_0 for the first document).

    G is the inclusive cumulative sum of g (float32). The difference G_t - G_s <= 0 is formed before exp, so nothing
    overflows. Shapes as ``gla_recurrent``; returns (o [B, T, H, V] float32, final_state [B, H, K, V] float32).
    """
    f32 = jnp.float32
    B, T, H, K = q.shape
    q = q.astype(f32) * scale
    k, v = k.astype(f32), v.astype(f32)
    G = jnp.cumsum(g.astype(f32), axis=1)  # [B, T, H, K]
    causal = jnp.tril(jnp.ones((T, T), bool))
    if segment_ids is None:
        same = jnp.broadcast_to(causal, (B, T, T))
        first_doc = jnp.ones((B, T), bool)
    else:
        same = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
        first_doc = segment_ids == segment_ids[:, :1]
    diff = G[:, :, None] - G[:, None, :]  # [B, Tq, Ts, H, K]
    diff = jnp.where(same[..., None, None], diff, -jnp.inf)
    a = jnp.einsum("bthk,bshk,btshk->bhts", q, k, jnp.exp(diff))
    o = jnp.einsum("bhts,bshv->bthv", a, v)
    # Final state: contributions of the last document only; exponents G_T - G_s <= 0.
    GT = G[:, -1:]  # [B, 1, H, K]
    last_doc = jnp.ones((B, T), bool) if segment_ids is None else segment_ids == segment_ids[:, -1:]
    kd = jnp.where(last_doc[..., None, None], k * jnp.exp(GT - G), 0.0)
    s_final = jnp.einsum("bshk,bshv->bhkv", kd, v)
    if initial_state is not None:
        s0 = initial_state.astype(f32)
        qd = jnp.where(first_doc[..., None, None], q * jnp.exp(G), 0.0)
        o = o + jnp.einsum("bthk,bhkv->bthv", qd, s0)
        carry = jnp.all(first_doc, axis=1)[:, None, None, None]  # the first document runs to the end
        s_final = s_final + jnp.where(carry, jnp.exp(GT[:, 0])[..., None] * s0, 0.0)
    return o, s_final
