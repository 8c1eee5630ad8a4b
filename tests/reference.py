"""An independent float64 GLA recurrence for the tests (plain loop in jax under x64), with its gradients.

Written here, apart from the library, so that the library's forms are checked against the math and not themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _recurrence64(q, k, v, g, s0, keep, scale):
    def step(s, x):
        q_t, k_t, v_t, g_t, keep_t = x
        s = s * jnp.exp(g_t)[..., None] * keep_t[:, None, None, None] + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        return s, jnp.einsum("bhk,bhkv->bhv", q_t * scale, s)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, keep))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s


def reference_gla(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None, do=None, ds=None):
    """float64 forward (and, with cotangents do/ds, gradients) of GLA.

    Returns numpy float64 arrays: (o, s_final) or, with do given, (o, s_final, (dq, dk, dv, dg, ds0)).
    """
    with jax.enable_x64(True):
        f64 = jnp.float64
        q, k, v, g = (jnp.asarray(np.asarray(a, np.float64), f64) for a in (q, k, v, g))
        B, T, H, K = q.shape
        V = v.shape[-1]
        scale = K ** -0.5 if scale is None else scale
        s0 = jnp.zeros((B, H, K, V), f64) if initial_state is None else jnp.asarray(np.asarray(initial_state, np.float64))
        if segment_ids is None:
            keep = jnp.ones((B, T), f64)
        else:
            seg = np.asarray(segment_ids)
            prev = np.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
            keep = jnp.asarray((seg == prev).astype(np.float64))
        fwd = lambda q, k, v, g, s0: _recurrence64(q, k, v, g, s0, keep, scale)
        if do is None:
            o, s = fwd(q, k, v, g, s0)
            return np.asarray(o), np.asarray(s)
        (o, s), vjp = jax.vjp(fwd, q, k, v, g, s0)
        do = jnp.asarray(np.asarray(do, np.float64))
        ds = jnp.zeros_like(s) if ds is None else jnp.asarray(np.asarray(ds, np.float64))
        grads = vjp((do, ds))
        return np.asarray(o), np.asarray(s), tuple(np.asarray(x) for x in grads)


def rel_err(x, ref) -> float:
    """Relative error ||x - ref|| / ||ref|| in float64 (Frobenius norm)."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))
