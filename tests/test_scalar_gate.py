"""The scalar-gate operator (gla_jax.ops.scalar) against a float64 scalar recurrence written here, and against the
vector-gate float64 reference (tests/reference.py) with the gate broadcast over K, as a second independent check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gla_jax.ops.scalar import gla_scalar, gla_scalar_step
from reference import reference_gla, rel_err
from zero_gates import PATTERNS, place_zero_gates

TOL = 1e-5


def scalar_recurrence64(q, k, v, g, *, scale, initial_state=None, segment_ids=None):
    """float64 numpy loop: S_t = e^{g_t} S_{t-1} (zeroed at document starts) + k_tᵀ v_t, o_t = scale q_t S_t."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    B, T, H, K = q.shape
    V = v.shape[-1]
    s = np.zeros((B, H, K, V)) if initial_state is None else np.array(initial_state, np.float64)
    o = np.zeros((B, T, H, V))
    for t in range(T):
        decay = np.exp(g[:, t])[..., None, None]
        if segment_ids is not None and t > 0:
            decay = decay * (np.asarray(segment_ids)[:, t] == np.asarray(segment_ids)[:, t - 1])[:, None, None, None]
        s = s * decay + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t] * scale, s)
    return o, s


def _inputs(B, T, H, K, V, seed=0, strong=False, dtype=np.float32):
    r = np.random.default_rng(seed)
    q, k = (r.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(2))
    v = r.standard_normal((B, T, H, V)).astype(np.float32)
    if strong:  # log alpha down to -20, mixed with ordinary decays
        g = -r.uniform(0, 20, (B, T, H))
    else:
        g = np.log(r.uniform(0.8, 1.0, (B, T, H)))
    return [jnp.asarray(a, dtype) for a in (q, k, v)] + [jnp.asarray(g, np.float32)]


def _loss_parts(B, T, H, K, V, seed):
    r = np.random.default_rng(seed + 99)
    return (r.standard_normal((B, T, H, V)).astype(np.float32), r.standard_normal((B, H, K, V)).astype(np.float32))


def _check_all(q, k, v, g, *, s0=None, seg=None, chunk_size=16, tol=TOL, group_chunks=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    do, ds = _loss_parts(B, T, H, K, V, 0)

    def f(q, k, v, g, s0):
        o, s = gla_scalar(q, k, v, g, initial_state=s0, output_final_state=True, segment_ids=seg,
                          chunk_size=chunk_size, group_chunks=group_chunks)
        return jnp.sum(o * do) + jnp.sum(s * ds), (o, s)

    s0j = jnp.zeros((B, H, K, V), jnp.float32) if s0 is None else jnp.asarray(s0)
    grads, (o, s) = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, g, s0j)
    # independent reference: the vector-gate float64 recurrence with g broadcast over K; grad of g summed over K
    gv = np.broadcast_to(np.asarray(g)[..., None], q.shape)
    o_ref, s_ref, (dq, dk, dv, dgv, ds0) = reference_gla(q, k, v, gv, initial_state=s0j, segment_ids=seg, do=do,
                                                         ds=ds)
    o_loop, s_loop = scalar_recurrence64(q, k, v, g, scale=K ** -0.5, initial_state=s0, segment_ids=seg)
    assert rel_err(o_loop, o_ref) < 1e-12 and rel_err(s_loop, s_ref) < 1e-12  # the two references agree
    errs = {"o": rel_err(o, o_ref), "s": rel_err(s, s_ref), "dq": rel_err(grads[0], dq), "dk": rel_err(grads[1], dk),
            "dv": rel_err(grads[2], dv), "dg": rel_err(grads[3], dgv.sum(-1)), "ds0": rel_err(grads[4], ds0)}
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errs})"
    return errs, grads


@pytest.mark.parametrize("shape,chunk", [((2, 50, 2, 16, 8), 16), ((1, 130, 3, 8, 16), 64), ((2, 7, 1, 4, 4), 16)])
def test_matches_float64_recurrence(shape, chunk):
    q, k, v, g = _inputs(*shape, seed=1)
    _check_all(q, k, v, g, chunk_size=chunk)


def test_initial_state_and_segments():
    B, T, H, K, V = 2, 70, 2, 8, 8
    q, k, v, g = _inputs(B, T, H, K, V, seed=2)
    s0 = np.random.default_rng(3).standard_normal((B, H, K, V)).astype(np.float32)
    seg = jnp.asarray(np.stack([np.repeat([0, 1, 2], [10, 40, 20]), np.repeat([5, 6], [33, 37])]), jnp.int32)
    _check_all(q, k, v, g, s0=s0, seg=seg, chunk_size=16)


def test_strong_decays_down_to_minus_20():
    q, k, v, g = _inputs(2, 48, 2, 8, 8, seed=4, strong=True)
    errs, _ = _check_all(q, k, v, g, chunk_size=16)
    assert errs["dg"] < TOL


def _with_zero_gates(g, pattern, seed):
    """g [B, T, H] with zero gates (-inf, or finite far below -104) placed by a tests/zero_gates.py pattern."""
    return jnp.asarray(place_zero_gates(np.asarray(g)[..., None], pattern, seed=seed)[..., 0])


def _packed_inputs(seed, T=150, gates=None):
    B, H, K, V = 2, 2, 16, 8
    q, k, v, g = _inputs(B, T, H, K, V, seed=seed)
    if gates is not None:
        g = jnp.full_like(g, gates)
    s0 = np.random.default_rng(seed + 1).standard_normal((B, H, K, V)).astype(np.float32)
    seg = jnp.asarray(np.stack([np.repeat([0, 1, 2], [30, 70, T - 100]), np.repeat([4, 5], [64, T - 64])]), jnp.int32)
    return q, k, v, g, s0, seg


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_zero_gates_match_float64(pattern, chunk):
    # alpha = 0 (g = -inf or <= -104) at the first position, mid-chunk, on chunk boundaries, several per chunk,
    # scattered; with packed documents and an initial state: forward, final state and every gradient finite and
    # float32-exact against the float64 recurrence, and dg exactly 0 at each zero gate (the limit g -> -inf).
    q, k, v, g, s0, seg = _packed_inputs(10)
    g = _with_zero_gates(g, pattern, seed=11)
    zero = np.asarray(g) <= -104.0
    assert zero.any()
    _, grads = _check_all(q, k, v, g, s0=s0, seg=seg, chunk_size=chunk)
    assert np.all(np.asarray(grads[3])[zero] == 0.0)


def test_zero_gates_among_strong_decays():
    # zero gates among log alpha = -20 per step: every exponent stays <= 0 and exact.
    q, k, v, g, s0, seg = _packed_inputs(12, gates=-20.0)
    _check_all(q, k, v, _with_zero_gates(g, "several_in_chunk", seed=13), s0=s0, seg=seg, chunk_size=64)


@pytest.mark.parametrize("group_chunks,gates", [(2, None), (4, -20.0)])
def test_group_loop_matches_float64(group_chunks, gates):
    # The group loop (group_chunks chunks per lax.scan step, state and its gradient carried between groups, the
    # last group padded with zero chunks): chunks of 16 over T = 150 are 10 chunks; documents start at 30 and 100
    # (row 0) and at 64 (row 1), a group start for both group sizes (the entering document must be handed across).
    q, k, v, g, s0, seg = _packed_inputs(16, gates=gates)
    g = _with_zero_gates(g, "several_in_chunk", seed=17)
    errs, grads = _check_all(q, k, v, g, s0=s0, seg=seg, chunk_size=16, group_chunks=group_chunks)
    assert np.all(np.asarray(grads[3])[np.asarray(g) <= -104.0] == 0.0)


def test_zero_gates_keep_small_gates_exact():
    # Tiny gates (1e-3 per step) after zero gates: a finite stand-in for -inf inside the cumulative gate (|b| >= 104)
    # would round them to float32's spacing there (~1e-5) and miss these bounds; the separate count keeps them exact.
    q, k, v, g = _inputs(1, 128, 2, 16, 16, seed=14)
    g = jnp.asarray(np.log(np.random.default_rng(15).uniform(0.999, 1.0, g.shape)), jnp.float32)
    g = g.at[:, 3].set(-jnp.inf).at[:, 70].set(-jnp.inf)
    errs, _ = _check_all(q, k, v, g, chunk_size=64, tol=1e-5)
    assert errs["o"] < 1e-6 and errs["s"] < 1e-6


def test_bfloat16_inputs():
    B, T, H, K, V = 1, 40, 2, 16, 16
    q, k, v, g = _inputs(B, T, H, K, V, seed=5, dtype=jnp.bfloat16)
    o, s = gla_scalar(q, k, v, g, output_final_state=True, chunk_size=16)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o_ref, s_ref = scalar_recurrence64(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), g,
                                       scale=K ** -0.5)
    assert rel_err(o, o_ref) < 1e-2 and rel_err(s, s_ref) < 1e-5


def test_step_matches_recurrence_and_continues_chunk_form():
    B, T, H, K, V = 2, 20, 2, 8, 4
    q, k, v, g = _inputs(B, T, H, K, V, seed=6)
    _, s = gla_scalar(q[:, :12], k[:, :12], v[:, :12], g[:, :12], output_final_state=True, chunk_size=16)
    outs = []
    for t in range(12, T):
        o_t, s = gla_scalar_step(q[:, t], k[:, t], v[:, t], g[:, t], s)
        outs.append(o_t)
    o_ref, s_ref = scalar_recurrence64(q, k, v, g, scale=K ** -0.5)
    assert rel_err(jnp.stack(outs, 1), o_ref[:, 12:]) < TOL and rel_err(s, s_ref) < TOL


def test_negative_control_wrong_gate_detected():
    """The comparison can fail: a slightly different gate moves the output far beyond the tolerance."""
    q, k, v, g = _inputs(1, 30, 2, 8, 8, seed=7)
    o, _ = gla_scalar(q, k, v, g * 1.01, chunk_size=16)
    o_ref, _ = scalar_recurrence64(q, k, v, g, scale=8 ** -0.5)
    assert rel_err(o, o_ref) > 10 * TOL


@pytest.mark.parametrize("kw,match", [
    (dict(g=jnp.zeros((1, 8, 2, 4))), "g: expected shape"),
    (dict(chunk_size=24), "chunk_size"),
    (dict(initial_state=jnp.zeros((1, 2, 4, 5))), "initial_state"),
    (dict(segment_ids=jnp.zeros((1, 8), jnp.float32)), "segment_ids"),
    (dict(scale="x"), "scale"),
])
def test_bad_inputs_name_the_argument(kw, match):
    args = dict(q=jnp.zeros((1, 8, 2, 4)), k=jnp.zeros((1, 8, 2, 4)), v=jnp.zeros((1, 8, 2, 4)),
                g=jnp.zeros((1, 8, 2)))
    args.update({n: kw.pop(n) for n in list(kw) if n in args})
    with pytest.raises(ValueError, match=match):
        gla_scalar(args["q"], args["k"], args["v"], args["g"], **kw)


# --- scalar gates through the public operator gla (gla_jax.ops.api) ---------------------------------------------

GLA_TOL = {"triton": 1e-4}  # Pallas interpret mode, as in tests/test_kernels.py; pure-JAX forms: TOL


def _gla_vjp(impl, q, k, v, g, s0, seg, do, ds, **kw):
    from gla_jax.ops import gla

    def f(q, k, v, g, s0):
        return gla(q, k, v, g, initial_state=s0, output_final_state=True, segment_ids=seg, impl=impl,
                   interpret=impl == "triton", **kw)

    @jax.jit
    def run(q, k, v, g, s0):
        (o, s), vjp = jax.vjp(f, q, k, v, g, s0)
        return o, s, vjp((do, ds))

    return run(q, k, v, g, s0)


@pytest.mark.parametrize("impl", ["auto", "chunk", "recurrent", "parallel", "triton"])
def test_gla_accepts_scalar_gates(impl):
    # gla with g [B, T, H] (zero gates included) vs the float64 vector-gate recurrence with g broadcast over K:
    # forward, final state and every gradient; dg comes back as [B, T, H] (summed over K where it was broadcast).
    q, k, v, g, s0, seg = _packed_inputs(20, T=100)
    g = _with_zero_gates(g, "mid_chunk", seed=21)
    B, T, H, K = q.shape
    do, ds = (jnp.asarray(x) for x in _loss_parts(B, T, H, K, v.shape[-1], 22))
    o, s, grads = _gla_vjp(impl, q, k, v, g, jnp.asarray(s0), seg, do, ds)
    assert grads[3].shape == (B, T, H) and grads[3].dtype == g.dtype
    gv = np.broadcast_to(np.asarray(g)[..., None], q.shape)
    o_ref, s_ref, (dq, dk, dv, dgv, ds0) = reference_gla(q, k, v, gv, initial_state=s0, segment_ids=seg, do=do, ds=ds)
    errs = {"o": rel_err(o, o_ref), "s": rel_err(s, s_ref), "dq": rel_err(grads[0], dq), "dk": rel_err(grads[1], dk),
            "dv": rel_err(grads[2], dv), "dg": rel_err(grads[3], dgv.sum(-1)), "ds0": rel_err(grads[4], ds0)}
    tol = GLA_TOL.get(impl, TOL)
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"{impl}: errors above {tol}: {bad} (all: {errs})"
    zero = np.asarray(g) <= -104.0
    assert zero.any() and np.all(np.asarray(grads[3])[zero] == 0.0)


@pytest.mark.parametrize("impl", ["auto", "chunk", "xla"])
def test_gla_runs_the_scalar_form_for_scalar_gates(impl):
    # "auto" (the chunk form on CPU), "chunk" and its alias run gla_scalar itself, not the broadcast vector form.
    from gla_jax.ops import gla

    q, k, v, g, s0, seg = _packed_inputs(23, T=100)
    kw = dict(initial_state=jnp.asarray(s0), output_final_state=True, segment_ids=seg, chunk_size=16)
    o, s = jax.jit(lambda q, k, v, g: gla(q, k, v, g, impl=impl, **kw))(q, k, v, g)
    o1, s1 = jax.jit(lambda q, k, v, g: gla_scalar(q, k, v, g, **kw))(q, k, v, g)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o1))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s1))


def test_gla_scalar_gate_kernel_is_shard_mapped():
    # A Pallas-style backend (not pure JAX) with its own scalar-gate kernel: under a mesh gla wraps it in shard_map
    # with g [B, T, H] split over batch and heads; the kernel sees local blocks and the result matches float64.
    from gla_jax.ops import gla, registry

    seen = []

    def load_scalar():
        def fn(q, k, v, g, *, interpret, output_final_state, **kw):
            seen.append(g.shape)
            return gla_scalar(q, k, v, g, output_final_state=output_final_state, **kw)

        return fn

    registry.register(registry.Backend("probe_scalar", lambda: None, load_scalar=load_scalar))
    try:
        q, k, v, g, s0, seg = _packed_inputs(24, T=100)
        mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        f = jax.jit(lambda q, k, v, g, s0: gla(q, k, v, g, initial_state=s0, output_final_state=True, segment_ids=seg,
                                               impl="probe_scalar", chunk_size=16, batch_axes="data",
                                               head_axes="tensor"))
        with jax.set_mesh(mesh):
            o, s = f(q, k, v, g, jnp.asarray(s0))
    finally:
        registry.unregister("probe_scalar")
    assert seen == [(1, 100, 1)]
    gv = np.broadcast_to(np.asarray(g)[..., None], q.shape)
    o_ref, s_ref = reference_gla(q, k, v, gv, initial_state=s0, segment_ids=seg)
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL


@pytest.mark.parametrize("shape", [(1, 8, 2, 1), (1, 8), (1, 8, 3), (1, 8, 2, 4, 1)])
def test_gla_bad_gate_shape_is_one_line_naming_g(shape):
    from gla_jax.ops import gla

    x = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"^g: expected shape \(1, 8, 2, 4\) .* or \(1, 8, 2\) .*got") as e:
        gla(x, x, x, jnp.zeros(shape))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["k", "v", "g"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_gla_scalar_gate_non_finite_reach(name, bad):
    # gla's non-finite contract holds for scalar gates too: a NaN/inf at t = 100 (chunk 64) leaves every position
    # before its chunk start (64) and every other row and head bit-for-bit unchanged; from t on, that row and head
    # are non-finite.
    from gla_jax.ops import gla

    q, k, v, g = _inputs(2, 200, 2, 16, 8, seed=25)
    clean = dict(q=q, k=k, v=v, g=g)
    bad_args = dict(clean)
    bad_args[name] = clean[name].at[(0, 100, 0, 3) if name != "g" else (0, 100, 0)].set(bad)
    run = jax.jit(lambda q, k, v, g: gla(q, k, v, g, impl="chunk", chunk_size=64)[0])
    o0, o = np.asarray(run(**clean)), np.asarray(run(**bad_args))
    np.testing.assert_array_equal(o[0, :64, 0], o0[0, :64, 0])
    np.testing.assert_array_equal(o[1], o0[1])
    np.testing.assert_array_equal(o[0, :, 1], o0[0, :, 1])
    assert not np.isfinite(o[0, 100:, 0]).all(axis=-1).any()
