"""Checks every GLA kernel package's tests make the same way: a kernel run against the float64 recurrence
(``reference.reference_gla``), and the reach of a non-finite input (the operator's contract, ``gla``'s docstring)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from reference import reference_gla, rel_err

#: The gradients of a kernel call, in argument order (q, k, v, g, initial_state).
NAMES = ("dq", "dk", "dv", "dg", "dh0")


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
