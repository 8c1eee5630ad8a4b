"""Recurrent GLA: a ``lax.scan`` over time with a float32 state. The ground truth; slow (T sequential steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gla_jax.ops.segments import segment_starts


def gla_recurrent(q, k, v, g, *, scale, initial_state=None, segment_ids=None):
    """S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t,  o_t = (scale q_t) S_t.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] or None; segment_ids: [B, T] or None
    (the state is zeroed before each document start; ``initial_state`` belongs to the first document).
    Returns (o [B, T, H, V] float32, final_state [B, H, K, V] float32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = jnp.float32
    s0 = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
    # keep[b, t] = 0 where a new document starts at t: the previous state is dropped there.
    keep = jnp.ones((B, T), f32) if segment_ids is None else 1.0 - segment_starts(segment_ids).astype(f32)
    xs = (
        jnp.moveaxis(q.astype(f32) * scale, 1, 0),
        jnp.moveaxis(k.astype(f32), 1, 0),
        jnp.moveaxis(v.astype(f32), 1, 0),
        jnp.moveaxis(g.astype(f32), 1, 0),
        jnp.moveaxis(keep, 1, 0),
    )

    def step(s, x):
        q_t, k_t, v_t, g_t, keep_t = x  # [B, H, K], ..., [B, H, V], [B, H, K], [B]
        s = s * (jnp.exp(g_t) * keep_t[:, None, None])[..., None] + k_t[..., :, None] * v_t[..., None, :]
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t, s)
        return s, o_t

    s_final, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s_final
