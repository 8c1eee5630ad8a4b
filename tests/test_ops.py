"""The GLA operator (gla_jax.ops.gla): every form against an independent float64 recurrence (tests/reference.py),
forward and all gradients, plus stability, state chaining, packed documents, transformations and input checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gla_jax.ops import gla, registry
from gla_jax.ops.chunk import gla_chunk
from reference import reference_gla, rel_err
from zero_gates import PATTERNS, place_zero_gates

IMPLS = [n for n in registry.names() if registry.get(n).pure_jax]  # every pure-JAX backend (runs on any platform)
F32_TOL = 1e-5
BF16_TOL = 2e-3


def make_inputs(B, T, H, K, V, *, seed=0, gate_scale=1.0, docs=0, init=True, dtype=jnp.float32):
    """Random inputs; g = gate_scale * log(u), u ~ U(0.05, 1) (so g <= 0); ``docs`` > 0 packs that many documents.

    Returns a dict of numpy arrays (already rounded to ``dtype``) plus cotangents do (rounded to ``dtype``, the
    dtype of o) and ds (float32).
    """
    rng = np.random.default_rng(seed)
    rnd = lambda *s: rng.standard_normal(s).astype(np.float32)
    as_dtype = lambda x: np.array(jnp.asarray(x, dtype).astype(jnp.float32))
    out = dict(
        q=as_dtype(rnd(B, T, H, K)), k=as_dtype(rnd(B, T, H, K)), v=as_dtype(rnd(B, T, H, V)),
        g=as_dtype(gate_scale * np.log(rng.uniform(0.05, 1.0, (B, T, H, K))).astype(np.float32)),
        s0=rnd(B, H, K, V) if init else None, seg=None,
        do=as_dtype(rnd(B, T, H, V)), ds=rnd(B, H, K, V),
    )
    if docs:
        cuts = np.sort(rng.integers(0, T, (B, docs - 1)), axis=1)
        out["seg"] = (np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32) + 7
    return out


@functools.lru_cache(maxsize=None)
def _vjp_fn(impl, has_seg, chunk_size=64, matmul_dtype=None):
    def f(q, k, v, g, s0, seg):
        if impl == "chunk" and matmul_dtype is not None:
            o, s = gla_chunk(q, k, v, g, scale=q.shape[-1] ** -0.5, initial_state=s0,
                             segment_ids=seg if has_seg else None, chunk_size=chunk_size, matmul_dtype=matmul_dtype)
            o = o.astype(q.dtype)
        else:
            o, s = gla(q, k, v, g, initial_state=s0, output_final_state=True, segment_ids=seg if has_seg else None,
                       impl=impl, chunk_size=chunk_size)
        return o, s

    @jax.jit
    def run(q, k, v, g, s0, seg, do, ds):
        (o, s), vjp = jax.vjp(lambda *a: f(*a, seg), q, k, v, g, s0)
        return o, s, vjp((do.astype(o.dtype), ds))

    return run


def run_impl(impl, x, dtype=jnp.float32, **kw):
    B, T, H, K = x["q"].shape
    V = x["v"].shape[-1]
    s0 = jnp.zeros((B, H, K, V), jnp.float32) if x["s0"] is None else jnp.asarray(x["s0"])
    seg = jnp.zeros((B, T), jnp.int32) if x["seg"] is None else jnp.asarray(x["seg"])
    args = [jnp.asarray(x[n], dtype) for n in "qkvg"]
    o, s, grads = _vjp_fn(impl, x["seg"] is not None, **kw)(*args, s0, seg, jnp.asarray(x["do"]), jnp.asarray(x["ds"]))
    return o, s, grads


def reference(x):
    return reference_gla(x["q"], x["k"], x["v"], x["g"], initial_state=x["s0"], segment_ids=x["seg"], do=x["do"],
                         ds=x["ds"])


def assert_close(impl, x, tol, dtype=jnp.float32, tol_g=None, **kw):
    o, s, grads = run_impl(impl, x, dtype, **kw)
    ro, rs, rgrads = reference(x)
    assert o.dtype == dtype
    errs = {"o": rel_err(o, ro), "final_state": rel_err(s, rs)}
    for name, got, want in zip(["dq", "dk", "dv", "dg", "ds0"], grads, rgrads):
        assert bool(jnp.all(jnp.isfinite(got))), f"{impl}: {name} not finite"
        errs[name] = rel_err(got, want)
    bad = {n: e for n, e in errs.items() if e > (tol_g if (n == "dg" and tol_g) else tol)}
    assert not bad, f"{impl}: relative errors above {tol}: {bad} (all: {errs})"
    return errs


# (B, T, H, K, V, docs, init): T not a multiple of 64, K != V, K or V of 16/64/128/256, odd widths.
CASES = [
    (2, 1, 2, 16, 32, 0, True),
    (1, 63, 2, 64, 16, 0, False),
    (1, 65, 1, 16, 128, 3, True),
    (1, 200, 1, 256, 64, 4, True),
    (2, 70, 1, 3, 256, 2, False),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}H{}K{}V{}d{}i{}".format(*c))
def test_float32_matches_float64_reference(impl, case):
    B, T, H, K, V, docs, init = case
    assert_close(impl, make_inputs(B, T, H, K, V, seed=T + K, docs=docs, init=init), F32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_matches_float64_reference(impl):
    # The cotangent of a bf16 output is itself bf16 (make_inputs rounds it), and outputs/gradients are rounded to
    # bf16 (rounding alone costs ~1.7e-3 relative): the remaining internal error must fit in the 2e-3 budget.
    x = make_inputs(1, 130, 2, 64, 32, seed=3, docs=2, dtype=jnp.bfloat16)
    assert_close(impl, x, BF16_TOL, dtype=jnp.bfloat16)


def test_chunk_bfloat16_matmuls():
    # Half-precision operands in the intra-chunk matmuls (the accelerator default): the q*dq - k*dk identity
    # amplifies their rounding in dg, so this path is held to fla's own bf16 tolerance (4e-3 .. 5e-3).
    x = make_inputs(1, 130, 2, 64, 32, seed=4, docs=2, dtype=jnp.bfloat16)
    assert_close("chunk", x, 4e-3, dtype=jnp.bfloat16, tol_g=5e-3, matmul_dtype=jnp.bfloat16)


@pytest.mark.slow
def test_chunk_other_chunk_sizes():
    x = make_inputs(1, 100, 1, 16, 24, seed=5, docs=2)
    assert_close("chunk", x, F32_TOL, chunk_size=16)
    assert_close("chunk", x, F32_TOL, chunk_size=128)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), gate_scale=st.floats(1e-3, 20.0), docs=st.integers(0, 4),
       init=st.booleans())
def test_chunk_property_gates_and_documents(seed, gate_scale, docs, init):
    # One shape (one compilation); gates from almost 0 down to about -60 per step, 0..4 documents.
    x = make_inputs(1, 150, 1, 8, 12, seed=seed, gate_scale=gate_scale, docs=docs, init=init)
    x["seg"] = np.zeros((1, 150), np.int32) if x["seg"] is None else x["seg"]
    # f32 cumulative gates of magnitude |b| carry an absolute error ~|b| * 6e-8 into every decay e^{b_i - b_j};
    # dg consists of such terms only, so its budget grows with the gate magnitude.
    assert_close("chunk", x, F32_TOL, tol_g=max(F32_TOL, 3e-6 * gate_scale))


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 150), H=st.integers(1, 2), K=st.integers(1, 40), V=st.integers(1, 40),
       docs=st.integers(0, 3), seed=st.integers(0, 1000))
def test_chunk_property_shapes(B, T, H, K, V, docs, seed):
    assert_close("chunk", make_inputs(B, T, H, K, V, seed=seed, docs=docs), F32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_stability_very_negative_gates(impl):
    # log alpha = -20 per step: every e^{-20 m} must stay finite and exact, gradients included.
    x = make_inputs(1, 300, 1, 16, 16, seed=6)
    x["g"] = np.full_like(x["g"], -20.0)
    assert_close(impl, x, F32_TOL)


def test_stability_long_sequence():
    # T = 16384 at log alpha = -20 per step (and a mild-gate half), against float64.
    x = make_inputs(1, 16384, 1, 16, 16, seed=7)
    x["g"][:, : 16384 // 2] = -20.0
    x["g"][:, 16384 // 2:] *= 0.05
    assert_close("chunk", x, F32_TOL)


def _zero_gate_inputs(pattern, dtype=jnp.float32, T=150):
    x = make_inputs(1, T, 2, 16, 8, seed=21, docs=3, dtype=dtype)
    x["g"] = place_zero_gates(x["g"], pattern, seed=21)
    return x


def _assert_zero_gate_gradients_vanish(impl, x, **kw):
    """dg is exactly 0 at every zero gate (the limit g -> -inf), as in the float64 recurrence's autodiff (which
    gives 0 at -inf and ~e^g, e.g. 1e-87 at g = -200, at finite gates below the floor)."""
    _, _, grads = run_impl(impl, x, **kw)
    zero = x["g"] <= -104.0
    assert zero.any()
    assert np.all(np.asarray(grads[3])[zero] == 0.0), f"{impl}: dg != 0 at a zero gate"
    assert np.all(np.abs(reference(x)[2][3][zero]) < 1e-40)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_zero_gates_match_float64(impl, pattern):
    # alpha = 0 (g = -inf, or finite far below the floor): the state is cleared exactly as in the recurrence,
    # forward and every gradient finite and float32-exact, with packed documents and an initial state.
    x = _zero_gate_inputs(pattern)
    assert_close(impl, x, F32_TOL)
    _assert_zero_gate_gradients_vanish(impl, x)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_gates_bfloat16(impl):
    assert_close(impl, _zero_gate_inputs("several_in_chunk", jnp.bfloat16), BF16_TOL, dtype=jnp.bfloat16)


@pytest.mark.parametrize("chunk_size", [16, 128])
def test_chunk_zero_gates_other_chunk_sizes(chunk_size):
    # chunk 16: the chunk is one sub-chunk; 128: zero gates on both sides of the inner 64 boundary.
    x = _zero_gate_inputs("chunk_boundary")
    assert_close("chunk", x, F32_TOL, chunk_size=chunk_size)
    _assert_zero_gate_gradients_vanish("chunk", x, chunk_size=chunk_size)


def test_chunk_zero_gates_keep_small_gates_exact():
    # Tiny gates (1e-3 per step) after a zero gate: a finite stand-in for -inf in the cumulative sum (|b| >= 104)
    # would round them to float32's spacing there (~1e-5) and miss this bound; the separate count keeps them exact.
    x = make_inputs(1, 128, 1, 16, 16, seed=22, gate_scale=1e-3)
    x["g"][:, 3] = -np.inf
    x["g"][:, 70] = -np.inf
    errs = assert_close("chunk", x, 1e-6, tol_g=1e-5)
    assert errs["o"] < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_gates_with_strong_gates(impl):
    # Zero gates among log alpha = -20 per step: exponents stay <= 0 and exact.
    x = make_inputs(1, 150, 1, 16, 16, seed=23, docs=2)
    x["g"] = place_zero_gates(np.full_like(x["g"], -20.0), "several_in_chunk", seed=23)
    assert_close(impl, x, F32_TOL)


# Where a non-finite input at position t poisons the outputs (the contract in gla's docstring): the first position
# that may be non-finite, P, for t = 100 and chunk 64. Before P (and in other rows and heads) the outputs are
# bit-for-bit those without it; from t on they are non-finite; for v the reach is really all of [P, t).
NAN_REACH = {"recurrent": 100, "chunk": 64, "parallel": 0}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["v", "g", "k"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_reach(impl, name, bad):
    x = make_inputs(2, 200, 2, 16, 8, seed=24)
    clean = [jnp.asarray(x[n]) for n in "qkvg"]
    args = list(clean)
    i = "qkvg".index(name)
    args[i] = args[i].at[0, 100, 0, 3].set(bad)
    run = lambda a: np.asarray(gla(*a, impl=impl, initial_state=jnp.asarray(x["s0"]))[0])
    o, o_clean = run(args), run(clean)
    first = NAN_REACH[impl]
    # Unaffected: other batch rows, other heads, and positions before ``first`` (finite and as without it).
    np.testing.assert_array_equal(o[1], o_clean[1])
    np.testing.assert_array_equal(o[0, :, 1], o_clean[0, :, 1])
    np.testing.assert_array_equal(o[0, :first, 0], o_clean[0, :first, 0])
    # Poisoned: every position from t on (the state carries it), and for v the whole reach is really used.
    assert not np.isfinite(o[0, 100:, 0]).all(axis=-1).any()
    if name == "v":
        assert not np.isfinite(o[0, first, 0]).all()


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_state_chaining(impl):
    # [0:T1] then [T1:T] with the carried state == one run over [0:T], gradients included (vs float64).
    T, T1 = 150, 70
    x = make_inputs(1, T, 2, 16, 8, seed=8)
    x["seg"] = np.searchsorted([30, 110], np.arange(T), side="right")[None].astype(np.int32)  # docs cross T1
    seg = jnp.asarray(x["seg"])
    q, k, v, g = (jnp.asarray(x[n]) for n in "qkvg")

    @jax.jit
    def loss(q, k, v, g, s0):
        o1, s1 = gla(q[:, :T1], k[:, :T1], v[:, :T1], g[:, :T1], initial_state=s0, output_final_state=True,
                     segment_ids=seg[:, :T1], impl=impl)
        # A document running across T1 continues with the carried state: the second piece's first position
        # is not a document start, whatever its id.
        o2, s2 = gla(q[:, T1:], k[:, T1:], v[:, T1:], g[:, T1:], initial_state=s1, output_final_state=True,
                     segment_ids=seg[:, T1:], impl=impl)
        o = jnp.concatenate([o1, o2], axis=1)
        return jnp.sum(o * x["do"]) + jnp.sum(s2 * x["ds"]), (o, s2)

    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, g,
                                                                                          jnp.asarray(x["s0"]))
    ro, rs, rgrads = reference(x)
    assert rel_err(o, ro) < F32_TOL and rel_err(s, rs) < F32_TOL
    for got, want in zip(grads, rgrads):
        assert rel_err(got, want) < F32_TOL


def test_chaining_across_a_document_start():
    # The split falls exactly on a document start: the second piece must drop the carried state by itself.
    T, T1 = 96, 40
    x = make_inputs(1, T, 1, 16, 16, seed=9)
    x["seg"] = (np.arange(T) >= T1).astype(np.int32)[None]
    q, k, v, g = (jnp.asarray(x[n]) for n in "qkvg")
    _, s1 = gla(q[:, :T1], k[:, :T1], v[:, :T1], g[:, :T1], initial_state=jnp.asarray(x["s0"]),
                output_final_state=True, impl="chunk")
    o2, _ = gla(q[:, T1:], k[:, T1:], v[:, T1:], g[:, T1:], initial_state=None, output_final_state=True, impl="chunk")
    ro, _ = reference_gla(x["q"], x["k"], x["v"], x["g"], initial_state=x["s0"], segment_ids=x["seg"])
    assert rel_err(o2, ro[:, T1:]) < F32_TOL
    assert float(jnp.linalg.norm(s1)) > 0


def test_segments_equal_documents_alone():
    # A packed row == each document run alone from a zero state (the first from initial_state), gradients too.
    x = make_inputs(2, 190, 1, 16, 32, seed=10, docs=4)
    o, s, (dq, dk, dv, dg, ds0) = run_impl("chunk", x)
    for b in range(2):
        ids = x["seg"][b]
        bounds = np.flatnonzero(np.diff(ids)) + 1
        for n, (lo, hi) in enumerate(zip(np.r_[0, bounds], np.r_[bounds, len(ids)])):
            sl = lambda a: a[b:b + 1, lo:hi]
            s0 = x["s0"][b:b + 1] if n == 0 else np.zeros_like(x["s0"][b:b + 1])
            last = hi == len(ids)
            ds = x["ds"][b:b + 1] if last else np.zeros_like(x["ds"][b:b + 1])
            ro, rs, rg = reference_gla(sl(x["q"]), sl(x["k"]), sl(x["v"]), sl(x["g"]), initial_state=s0,
                                       do=sl(x["do"]), ds=ds)
            assert rel_err(sl(np.asarray(o)), ro) < F32_TOL
            for got, want in zip((dq, dk, dv, dg), rg[:4]):
                assert rel_err(sl(np.asarray(got)), want) < F32_TOL
            if last:
                assert rel_err(np.asarray(s)[b:b + 1], rs) < F32_TOL
            if n == 0:
                assert rel_err(np.asarray(ds0)[b:b + 1], rg[4]) < F32_TOL


def test_padding_never_changes_results():
    # Appending positions with q = k = v = 0 and g = 0 leaves o and the final state unchanged.
    x = make_inputs(1, 50, 1, 16, 16, seed=11)
    q, k, v, g = (jnp.asarray(x[n]) for n in "qkvg")
    o, s = gla(q, k, v, g, output_final_state=True, impl="chunk")
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 30), (0, 0), (0, 0)))
    op, sp = gla(pad(q), pad(k), pad(v), pad(g), output_final_state=True, impl="chunk")
    np.testing.assert_allclose(op[:, :50], o, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sp, s, rtol=1e-6, atol=1e-6)


def test_chunk_gradient_matches_recurrent_long():
    # The impl users train with: its gradient at T = 4096 agrees with the recurrent one (and both with float64).
    x = make_inputs(1, 4096, 1, 16, 16, seed=12, gate_scale=0.1)
    o_c, s_c, g_c = run_impl("chunk", x)
    o_r, s_r, g_r = run_impl("recurrent", x)
    assert rel_err(o_c, o_r) < F32_TOL and rel_err(s_c, s_r) < F32_TOL
    for a, b in zip(g_c, g_r):
        assert rel_err(a, b) < 2 * F32_TOL


def test_vmap_jit_checkpoint():
    x = make_inputs(3, 70, 1, 16, 8, seed=13)
    q, k, v, g = (jnp.asarray(x[n]) for n in "qkvg")
    s0 = jnp.asarray(x["s0"])

    def loss(q, k, v, g, s0):
        o, s = gla(q, k, v, g, initial_state=s0, output_final_state=True, impl="chunk")
        return jnp.sum(o * x["do"][:1]) + jnp.sum(s * x["ds"][:1])

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    # vmap over the batch (each element as a batch of one) == the reference per element.
    one = lambda a: a[:, None]
    vg = jax.jit(jax.vmap(grad))(one(q), one(k), one(v), one(g), s0[:, None])
    ck = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3, 4)))(q[:1], k[:1], v[:1], g[:1], s0[:1])
    for b in range(3):
        ro, rs, rg = reference_gla(x["q"][b:b + 1], x["k"][b:b + 1], x["v"][b:b + 1], x["g"][b:b + 1],
                                   initial_state=x["s0"][b:b + 1], do=x["do"][:1], ds=x["ds"][:1])
        for got, want in zip(vg, rg):
            assert rel_err(got[b], want) < F32_TOL
        if b == 0:
            for got, want in zip(ck, rg):
                assert rel_err(got, want) < F32_TOL


def test_output_contract():
    x = make_inputs(1, 20, 2, 16, 8, seed=14)
    q, k, v, g = (jnp.asarray(x[n], jnp.bfloat16) for n in "qkvg")
    o, s = gla(q, k, v, g, impl="chunk")
    assert o.shape == (1, 20, 2, 8) and o.dtype == jnp.bfloat16 and s is None
    o, s = gla(q, k, v, g, impl="chunk", output_final_state=True)
    assert s.shape == (1, 2, 16, 8) and s.dtype == jnp.float32
    # Default scale is K ** -0.5.
    o1, _ = gla(*(jnp.asarray(x[n]) for n in "qkvg"), impl="chunk")
    o2, _ = gla(*(jnp.asarray(x[n]) for n in "qkvg"), impl="chunk", scale=0.25)
    np.testing.assert_allclose(o1, o2, rtol=1e-6, atol=1e-6)


def _ok():
    z = lambda *s: jnp.zeros(s, jnp.float32)
    return dict(q=z(1, 8, 2, 4), k=z(1, 8, 2, 4), v=z(1, 8, 2, 3), g=z(1, 8, 2, 4))


BAD = [
    (dict(q=jnp.zeros((8, 2, 4))), {}, "q"),
    (dict(k=jnp.zeros((1, 8, 2, 5))), {}, "k"),
    (dict(g=jnp.zeros((1, 8, 3, 4))), {}, "g"),
    (dict(v=jnp.zeros((1, 7, 2, 3))), {}, "v"),
    (dict(v=jnp.zeros((1, 8, 2, 3), jnp.int32)), {}, "v"),
    (dict(q=jnp.zeros((1, 8, 2, 4), jnp.int32)), {}, "q"),
    (dict(q=[[1.0]]), {}, "q"),
    ({}, dict(impl="flash"), "impl"),
    ({}, dict(chunk_size=48), "chunk_size"),
    ({}, dict(chunk_size=8), "chunk_size"),
    ({}, dict(chunk_size="64"), "chunk_size"),
    ({}, dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), "segment_ids"),
    ({}, dict(segment_ids=jnp.zeros((1, 8), jnp.float32)), "segment_ids"),
    ({}, dict(initial_state=jnp.zeros((1, 2, 3, 4))), "initial_state"),
    ({}, dict(initial_state=jnp.zeros((1, 2, 4, 3), jnp.int32)), "initial_state"),
    ({}, dict(scale="x"), "scale"),
    ({}, dict(impl="chunk", interpret=True), "interpret"),
    ({}, dict(impl="auto", interpret=True), "interpret"),
    ({}, dict(impl="triton", interpret="yes"), "interpret"),
    ({}, dict(batch_axes=3), "batch_axes"),
    ({}, dict(head_axes=("tensor", 1)), "head_axes"),
]


@pytest.mark.parametrize("arrays,kwargs,name", BAD, ids=[f"{n}{i}" for i, (_, _, n) in enumerate(BAD)])
def test_bad_inputs_raise_value_error(arrays, kwargs, name):
    args = {**_ok(), **arrays}
    with pytest.raises(ValueError, match=rf"^{name}:") as info:
        gla(args["q"], args["k"], args["v"], args["g"], **kwargs)
    assert "\n" not in str(info.value)
    # The same check runs under jit, at trace time.
    if not isinstance(args["q"], list):
        with pytest.raises(ValueError, match=rf"^{name}:"):
            jax.jit(lambda q, k, v, g: gla(q, k, v, g, **kwargs))(args["q"], args["k"], args["v"], args["g"])


@pytest.mark.parametrize("group_chunks,docs,pattern", [(4, 0, None), (2, 5, None), (4, 3, "scattered")])
def test_chunk_group_loop_matches_float64(group_chunks, docs, pattern):
    """The CPU group loop (``group_chunks`` chunks per lax.scan step, the state and its gradient carried between
    groups, zero chunks padding the last group, the entering document handed across groups) against the float64
    recurrence: outputs, final state and every gradient, with packed documents and zero gates."""
    x = make_inputs(2, 333, 2, 16, 8, seed=11, docs=docs)  # 6 chunks of 64: 3 groups of 2, or 2 of 4 (2 padded)
    if docs:  # documents also start exactly at group starts (positions 128 and 256)
        x["seg"] = x["seg"] + 100 * (np.arange(333) >= 128) + 100 * (np.arange(333) >= 256)
    if pattern is not None:
        x["g"] = place_zero_gates(x["g"], pattern)
    s0 = jnp.asarray(x["s0"])
    seg = None if x["seg"] is None else jnp.asarray(x["seg"])

    @jax.jit
    def run(q, k, v, g, s0, do, ds):
        f = lambda *a: gla_chunk(*a[:4], scale=q.shape[-1] ** -0.5, initial_state=a[4], segment_ids=seg,
                                 group_chunks=group_chunks)
        (o, s), vjp = jax.vjp(f, q, k, v, g, s0)
        return o, s, vjp((do, ds))

    o, s, grads = run(*(jnp.asarray(x[n]) for n in "qkvg"), s0, jnp.asarray(x["do"]), jnp.asarray(x["ds"]))
    ro, rs, rgrads = reference(x)
    assert rel_err(o, ro) <= F32_TOL and rel_err(s, rs) <= F32_TOL
    for name, a, b in zip(("dq", "dk", "dv", "dg", "ds0"), grads, rgrads):
        assert rel_err(a, b) <= F32_TOL, name


@pytest.mark.parametrize("T,G,want", [(333, 4, 512), (333, 2, 384), (333, 0, 384), (300, 8, 320), (513, 8, 1024),
                                      (512, 8, 512)])
def test_pad_to_chunks_pads_once_to_whole_groups(T, G, want):
    """Inputs are padded once: to whole groups of G chunks of 64 when the group loop applies (more than G chunks),
    else to whole chunks; zeros appended, the padded rows' documents continue the last one."""
    from gla_jax.ops.chunk_math import pad_to_chunks

    x = jnp.arange(1.0, 2 * T + 1).reshape(1, T, 2)
    seg = jnp.asarray(np.repeat([[3, 7]], [T // 2, T - T // 2], axis=1))
    (xp,), doc = pad_to_chunks([x], seg, 64, G)
    assert xp.shape == (1, want, 2) and doc.shape == (1, want // 64, 64)
    np.testing.assert_array_equal(xp[:, :T], x)
    assert not np.any(np.asarray(xp[:, T:]))
    flat = np.asarray(doc).reshape(-1)
    np.testing.assert_array_equal(flat[T:], flat[T - 1])
    np.testing.assert_array_equal(flat[:T], np.arange(T) >= T // 2)


@pytest.mark.parametrize("chunk_size,sub_chunk,group_chunks", [(64, 1, 0), (64, 2, 3), (64, 16, 2), (32, 8, 0),
                                                               (128, 8, 0), (16, 16, 0)])
def test_chunk_bisection_sizes_match_float64(chunk_size, sub_chunk, group_chunks):
    """Every bisection depth (chunk_size / sub_chunk = 1 .. 64 rows per diagonal block) against the float64
    recurrence, with strong gates (log alpha down to about -48 per step: every decay exponent must stay <= 0),
    zero gates and packed documents, through the group loop and without it."""
    gate_scale = 16.0
    x = make_inputs(1, 200, 2, 16, 8, seed=5, docs=3, gate_scale=gate_scale)
    x["g"] = place_zero_gates(x["g"], "scattered")
    seg = jnp.asarray(x["seg"])

    @jax.jit
    def run(q, k, v, g, s0, do, ds):
        f = lambda *a: gla_chunk(*a[:4], scale=q.shape[-1] ** -0.5, initial_state=a[4], segment_ids=seg,
                                 chunk_size=chunk_size, sub_chunk=sub_chunk, group_chunks=group_chunks)
        (o, s), vjp = jax.vjp(f, q, k, v, g, s0)
        return o, s, vjp((do, ds))

    o, s, grads = run(*(jnp.asarray(x[n]) for n in "qkvg"), jnp.asarray(x["s0"]), jnp.asarray(x["do"]),
                      jnp.asarray(x["ds"]))
    ro, rs, rgrads = reference(x)
    assert rel_err(o, ro) <= F32_TOL and rel_err(s, rs) <= F32_TOL
    for name, a, b in zip(("dq", "dk", "dv", "dg", "ds0"), grads, rgrads):
        # As in test_chunk_property_gates_and_documents: dg's budget grows with the gate magnitude.
        assert rel_err(a, b) <= (max(F32_TOL, 3e-6 * gate_scale) if name == "dg" else F32_TOL), name


@pytest.mark.parametrize("kwargs,name", [(dict(sub_chunk=12), "sub_chunk"), (dict(sub_chunk=0), "sub_chunk"),
                                         (dict(chunk_size=48), "chunk_size")])
def test_gla_chunk_bad_sizes(kwargs, name):
    q = jnp.ones((1, 20, 1, 4))
    with pytest.raises(ValueError, match=rf"^{name}:"):
        gla_chunk(q, q, q, -q, scale=0.5, **kwargs)
