"""Inputs and checks every GLA kernel package's tests share: random inputs (:func:`kernel_inputs`), a kernel run
against the float64 recurrence (``reference.reference_gla``), zero gates' exact dg, and the reach of a non-finite
input (the operator's contract, ``gla``'s docstring)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from reference import reference_gla, rel_err

#: The gradients of a kernel call, in argument order (q, k, v, g, initial_state).
NAMES = ("dq", "dk", "dv", "dg", "dh0")


def kernel_inputs(B, T, H, K, V, dtype, seed, *, gate="layer", segments=False, boundary=None, round_gates=True):
    """Random kernel inputs rounded to ``dtype`` (returned as float32 numpy): q, k [B, T, H, K], v [B, T, H, V], gates
    g [B, T, H, K] (``gate`` "layer": like the layer, log_sigmoid(z) / 16 plus some faster-decaying channels;
    "strong": down to -20 per step; rounded to ``dtype`` too unless ``round_gates`` is False), h0 [B, H, K, V], segment
    ids [B, T] int32 with 3 documents per row (``segments``; with ``boundary``, one cut on that chunk boundary when T
    allows, else two random cuts) or None, and the cotangents do [B, T, H, V], dst [B, H, K, V]."""
    rng = np.random.default_rng(seed)
    rnd = lambda *shape: np.asarray(jnp.asarray(rng.standard_normal(shape), dtype).astype(jnp.float32))
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    if gate == "layer":
        z = rng.standard_normal((B, T, H, K)) * 2.0
        g = -np.logaddexp(0.0, -z) / np.where(rng.random((B, T, H, K)) < 0.3, 1.0, 16.0)
    else:
        g = -rng.uniform(0.0, 20.0, (B, T, H, K))
    g = np.asarray(jnp.asarray(g, dtype).astype(jnp.float32)) if round_gates else g.astype(np.float32)
    h0 = rng.standard_normal((B, H, K, V)).astype(np.float32)
    seg = None
    if segments:
        seg = np.zeros((B, T), np.int32)
        for b in range(B):
            if boundary is None:
                cuts = np.sort(rng.choice(np.arange(1, T), 2, replace=False))
            else:
                cuts = sorted({int(rng.integers(1, min(T, boundary))), min(boundary, T - 1)})
            seg[b, cuts[0]:] = 1
            seg[b, cuts[-1]:] = 2
    do = rnd(B, T, H, V)
    dst = rng.standard_normal((B, H, K, V)).astype(np.float32)
    return q, k, v, g, h0, seg, do, dst


def assert_zero_gates_exact(dg, g):
    """dg is exactly 0 wherever the gate is a zero gate (g <= -104: alpha = 0 in float32)."""
    assert np.all(np.asarray(dg)[g <= -104.0] == 0.0), "dg != 0 at a zero gate"


def assert_matches_reference(o, s, grads, inputs, *, dtype, with_state: bool, final_state: bool, tol: float):
    """Asserts that a kernel's output o, final state s and gradients match the float64 recurrence within ``tol``
    (relative error), with the expected dtypes and shapes, and that every gradient is finite.

    inputs: (q, k, v, g, h0, seg, do, dst) float32 numpy (seg may be None) as the kernel got them, do and dst the
    cotangents of o and s. Returns {name: relative error}."""
    q, k, v, g, h0, seg, do, dst = inputs
    assert o.dtype == dtype and o.shape == v.shape
    ro, rs, rgrads = reference_gla(q, k, v, g, initial_state=h0 if with_state else None, segment_ids=seg, do=do,
                                   ds=dst if final_state else None)
    errs = {"o": rel_err(o, ro)}
    if final_state:
        assert s.dtype == jnp.float32 and s.shape == h0.shape
        errs["final_state"] = rel_err(s, rs)
    else:
        assert s is None
    for name, x, ref in zip(NAMES if with_state else NAMES[:4], grads, rgrads):
        assert np.all(np.isfinite(np.asarray(x, np.float32))), name
        errs[name] = rel_err(x, ref)
    for name, err in errs.items():
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol:g} (all: {errs})"
    return errs


def assert_non_finite_reach(chunk_gla, inputs, name: str, t: int, chunk: int):
    """A NaN in input ``name`` ("q", "k", "v" or "g") at position t of batch row 0, head 0 makes that row and head
    non-finite from the start of t's chunk (``chunk`` long) at the latest from t on; every earlier position and every
    other row and head stay bit-for-bit as without it. inputs: (q, k, v, g, h0) float32 numpy with B, H >= 2;
    ``chunk_gla`` runs in interpret mode."""
    q, k, v, g, h0 = inputs
    x = dict(q=q, k=k, v=v, g=g)
    run = lambda x: np.asarray(chunk_gla(*(jnp.asarray(x[n]) for n in "qkvg"), initial_state=jnp.asarray(h0),
                                         interpret=True)[0])
    o_clean = run(x)
    x[name] = x[name].copy()
    x[name][0, t, 0, 3] = np.nan
    o = run(x)
    start = t // chunk * chunk
    np.testing.assert_array_equal(o[1], o_clean[1])
    np.testing.assert_array_equal(o[0, :, 1], o_clean[0, :, 1])
    np.testing.assert_array_equal(o[0, :start, 0], o_clean[0, :start, 0])
    assert not np.isfinite(o[0, t:, 0]).all(axis=-1).any()
    if name == "v":
        assert not np.isfinite(o[0, start, 0]).all()
