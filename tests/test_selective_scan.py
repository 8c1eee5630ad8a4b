"""The chunked selective scan (gla_jax.ops.selective_scan) against a float64 plain lax.scan written here (forward,
final state, gradients of every input), and its backward memory against the unchunked scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gla_jax.ops.selective_scan import selective_scan, selective_scan_sequential, selective_scan_step
from reference import rel_err

TOL = 1e-5


def reference_scan64(x, dt, A, B, C, D, z, h0):
    """float64 (under x64) h_t = e^{dt A} h + dt x B, y = h·C + D x, y *= silu(z); returns (y, h_T)."""

    def step(h, xs):
        x_t, dt_t, b_t, c_t = xs
        h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * x_t)[..., None] * b_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, c_t)

    h, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)))
    y = jnp.moveaxis(y, 0, 1) + x * D
    return y * z * jax.nn.sigmoid(z), h


def _inputs(Bb, T, Dm, N, seed=0):
    r = np.random.default_rng(seed)
    x = r.standard_normal((Bb, T, Dm))
    dt = np.log1p(np.exp(r.standard_normal((Bb, T, Dm)) - 1.0))  # softplus
    A = -np.exp(r.standard_normal((Dm, N)) * 0.5)
    B, C = r.standard_normal((Bb, T, N)), r.standard_normal((Bb, T, N))
    D = r.standard_normal(Dm)
    z = r.standard_normal((Bb, T, Dm))
    h0 = r.standard_normal((Bb, Dm, N))
    return [a.astype(np.float32) for a in (x, dt, A, B, C, D, z, h0)]


@pytest.mark.parametrize("shape,chunk,inner", [((2, 37, 6, 4), 8, "associative"), ((2, 37, 6, 4), 8, "sequential"),
                                               ((1, 64, 4, 16), 64, "associative"), ((2, 5, 3, 2), 16, "sequential")])
def test_forward_and_gradients_match_float64(shape, chunk, inner):
    args = _inputs(*shape)
    r = np.random.default_rng(1)
    dy = r.standard_normal(args[0].shape).astype(np.float32)
    dh = r.standard_normal(args[7].shape).astype(np.float32)

    def loss(fn, *a):
        x, dt, A, B, C, D, z, h0 = a
        y, h = fn(x, dt, A, B, C, D, z, h0)
        return jnp.sum(y * dy) + jnp.sum(h * dh), (y, h)

    def ours(x, dt, A, B, C, D, z, h0):
        return selective_scan(x, dt, A, B, C, D, z, initial_state=h0, output_final_state=True, chunk_size=chunk,
                              inner=inner)

    g, (y, h) = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=tuple(range(8)), has_aux=True))(*args)
    with jax.enable_x64(True):
        a64 = [jnp.asarray(a, jnp.float64) for a in args]
        dy, dh = jnp.asarray(dy, jnp.float64), jnp.asarray(dh, jnp.float64)
        g64, (y64, h64) = jax.grad(lambda *a: loss(reference_scan64, *a), argnums=tuple(range(8)), has_aux=True)(*a64)
        g64, y64, h64 = [np.asarray(t) for t in g64], np.asarray(y64), np.asarray(h64)
    assert rel_err(y, y64) < TOL and rel_err(h, h64) < TOL
    names = ("x", "dt", "A", "B", "C", "D", "z", "h0")
    errs = {n: rel_err(a, b) for n, a, b in zip(names, g, g64)}
    assert all(e < TOL for e in errs.values()), errs


@pytest.mark.parametrize("inner", ["sequential", "associative"])
def test_segments_reset_the_state(inner):
    """Packed documents: the chunked scan (documents starting mid-chunk) equals a float64 scan per document."""
    x, dt, A, B, C, D, z, h0 = _inputs(1, 29, 3, 4, seed=4)
    seg = jnp.asarray(np.repeat([3, 4, 7], [5, 15, 9])[None], jnp.int32)
    y, h = selective_scan(x, dt, A, B, C, D, z, initial_state=h0, output_final_state=True, chunk_size=8, inner=inner,
                          segment_ids=seg)
    ys, hs = selective_scan_sequential(x, dt, A, B, C, D, z, initial_state=h0, output_final_state=True,
                                       segment_ids=seg)
    with jax.enable_x64(True):
        parts, state = [], None
        for lo, hi in ((0, 5), (5, 20), (20, 29)):
            a = [jnp.asarray(t[:, lo:hi], jnp.float64) for t in (x, dt)]
            b = [jnp.asarray(t[:, lo:hi], jnp.float64) for t in (B, C)]
            s0 = jnp.asarray(h0, jnp.float64) if lo == 0 else jnp.zeros((1, 3, 4), jnp.float64)
            y_d, state = reference_scan64(a[0], a[1], jnp.asarray(A, jnp.float64), b[0], b[1],
                                          jnp.asarray(D, jnp.float64), jnp.asarray(z[:, lo:hi], jnp.float64), s0)
            parts.append(np.asarray(y_d))
        y64, h64 = np.concatenate(parts, axis=1), np.asarray(state)
    assert rel_err(y, y64) < TOL and rel_err(h, h64) < TOL
    assert rel_err(ys, y64) < TOL and rel_err(hs, h64) < TOL


def test_sequential_form_and_steps_agree_with_chunked():
    x, dt, A, B, C, D, z, h0 = _inputs(2, 30, 4, 8, seed=2)
    y, h = selective_scan(x, dt, A, B, C, D, z, initial_state=h0, output_final_state=True, chunk_size=8)
    ys, hs = selective_scan_sequential(x, dt, A, B, C, D, z, initial_state=h0, output_final_state=True)
    assert rel_err(ys, y) < TOL and rel_err(hs, h) < TOL
    # the first 20 steps chunked, then one step at a time
    _, s = selective_scan(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], D, z[:, :20], initial_state=h0,
                          output_final_state=True, chunk_size=8)
    outs = []
    for t in range(20, 30):
        o, s = selective_scan_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t], s)
        outs.append(o)
    assert rel_err(jnp.stack(outs, 1), y[:, 20:]) < TOL and rel_err(s, h) < TOL


def test_negative_control_changed_A_is_detected():
    x, dt, A, B, C, D, z, h0 = _inputs(1, 20, 3, 4, seed=3)
    y, _ = selective_scan(x, dt, A * 1.01, B, C, D, z, chunk_size=8)
    with jax.enable_x64(True):
        y64, _ = reference_scan64(*(jnp.asarray(a, jnp.float64) for a in (x, dt, A, B, C, D, z)),
                                  jnp.zeros((1, 3, 4), jnp.float64))
    assert rel_err(y, np.asarray(y64)) > 10 * TOL


def _backward_temp_bytes(fn, T, Dm=32, N=16):
    x = jnp.zeros((1, T, Dm))
    A = -jnp.ones((Dm, N))
    Bm = jnp.zeros((1, T, N))
    grad = jax.jit(jax.grad(lambda x, dt, B, C: jnp.sum(fn(x, dt, A, B, C)[0]), argnums=(0, 1, 2, 3)))
    stats = grad.lower(x, x, Bm, Bm).compile().memory_analysis()
    if stats is None:
        pytest.skip("no compiled memory analysis on this backend")
    return stats.temp_size_in_bytes


def test_backward_memory_grows_with_chunks_not_steps():
    """At T = 4096, Dm·N = 512: the per-step states alone are 8 MiB; the chunked backward stays well below."""
    T = 4096
    per_step_states = T * 32 * 16 * 4
    plain = _backward_temp_bytes(lambda *a: selective_scan_sequential(*a), T)
    assert plain >= per_step_states, plain
    for inner in ("sequential", "associative"):
        chunked = _backward_temp_bytes(lambda *a: selective_scan(*a, chunk_size=64, inner=inner), T)
        assert chunked < per_step_states / 2 and chunked < plain / 4, (inner, chunked, plain)


@pytest.mark.parametrize("bad,match", [("dt", "dt: expected shape"), ("A", "A: expected shape"),
                                       ("B", "B: expected shape"), ("chunk", "chunk_size"),
                                       ("inner", "inner")])
def test_bad_inputs_name_the_argument(bad, match):
    x, dt, A, B, C, D, z, h0 = _inputs(1, 6, 3, 2)
    kw = dict(chunk_size=8)
    if bad == "dt":
        dt = dt[:, :5]
    elif bad == "A":
        A = A.T
    elif bad == "B":
        B = B[..., :1]
    elif bad == "inner":
        kw["inner"] = "parallel"
    else:
        kw["chunk_size"] = 0
    with pytest.raises(ValueError, match=match):
        selective_scan(x, dt, A, B, C, D, z, **kw)
