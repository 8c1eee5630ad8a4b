"""Pallas Triton GLA kernels (gla_jax.kernels.triton) without a GPU: interpret mode against the float64 recurrence, and
lowering for CUDA on CPU (the Triton lowering must accept every kernel at the paper's head sizes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from gla_jax.kernels import chunk_gla
from gla_jax.kernels.triton.lowering import lower_for_cuda, triton_kernel_count
from gla_jax.kernels.triton.tiling import compiler_params
from kernel_checks import (assert_matches_reference, assert_non_finite_reach, assert_zero_gates_exact,
                           kernel_inputs)
from reference import rel_err
from zero_gates import PATTERNS, place_zero_gates

F32_TOL = 1e-4
BF16_TOL = 3e-3


def _run(q, k, v, g, h0, seg, do, dst, dtype, *, with_state, final_state, **kw):
    """Kernel forward and vjp (jitted, interpret mode). Returns (o, final_state or None, grads)."""
    seg_j = None if seg is None else jnp.asarray(seg)

    def f(q, k, v, g, h0):
        return chunk_gla(q, k, v, g, initial_state=h0 if with_state else None, output_final_state=final_state,
                         segment_ids=seg_j, interpret=True, **kw)

    @jax.jit
    def go(q, k, v, g, h0):
        (o, s), vjp = jax.vjp(f, q, k, v, g, h0)
        cot = (jnp.asarray(do, o.dtype), jnp.asarray(dst) if final_state else None)
        return o, s, vjp(cot)

    cast = lambda x: jnp.asarray(x, dtype)
    return go(cast(q), cast(k), cast(v), cast(g), jnp.asarray(h0))


def _check(case, dtype, *, with_state, final_state, segments, gate="layer", seed=0, zeros=None, **kw):
    """Kernel vs float64 recurrence, forward and every gradient; ``zeros``: a ``zero_gates.PATTERNS`` placement of
    zero gates (then dg must also be exactly 0 at each of them)."""
    q, k, v, g, h0, seg, do, dst = kernel_inputs(*case, dtype, seed, gate=gate, segments=segments)
    if zeros is not None:
        g = place_zero_gates(g, zeros, seed=seed)
    o, s, grads = _run(q, k, v, g, h0, seg, do, dst, dtype, with_state=with_state, final_state=final_state, **kw)
    errs = assert_matches_reference(o, s, grads, (q, k, v, g, h0, seg, do, dst), dtype=dtype, with_state=with_state,
                                    final_state=final_state, tol=F32_TOL if dtype == jnp.float32 else BF16_TOL)
    if zeros is not None:
        assert_zero_gates_exact(grads[3], g)
    return errs


# (B, T, H, K, V): T never a multiple of 64.
@pytest.mark.parametrize(
    "case, with_state, final_state, segments",
    [
        ((2, 100, 2, 32, 32), False, False, False),
        ((1, 130, 2, 64, 32), True, True, True),
        ((1, 70, 1, 128, 64), True, True, False),
        ((1, 50, 2, 48, 40), False, True, True),  # K, V not powers of two: padded
    ],
)
def test_float32_matches_reference(case, with_state, final_state, segments):
    _check(case, jnp.float32, with_state=with_state, final_state=final_state, segments=segments)


@pytest.mark.parametrize("T", [100, 300])
def test_bfloat16_matches_reference(T):
    """Every output and gradient within 3e-3; at T = 300 (5 chunks) dg's error must not have grown with T (its
    chunk-local identity sums nothing across chunks; a global reverse cumsum measured 5e-3..1e-2 here)."""
    _check((1, T, 2, 64, 64), jnp.bfloat16, with_state=True, final_state=True, segments=True)


def test_bfloat16_inputs_float32_matmuls():
    """matmul_dtype=float32 with bfloat16 inputs: every output and gradient within the bfloat16 bound."""
    _check((1, 100, 2, 32, 32), jnp.bfloat16, with_state=True, final_state=True, segments=True, seed=4,
           matmul_dtype=jnp.float32)


def test_strong_gates_stay_exact():
    """Per-step gates down to -20: nothing overflows, still float32-exact."""
    _check((1, 80, 1, 32, 32), jnp.float32, with_state=True, final_state=True, segments=False, gate="strong")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_zero_gates_match_reference(pattern):
    """alpha = 0 (g = -inf or far below the floor) clears the state exactly as the recurrence does: forward and
    every gradient finite and float32-exact, with packed documents and an initial state."""
    _check((1, 150, 2, 32, 32), jnp.float32, with_state=True, final_state=True, segments=True, seed=7,
           zeros=pattern)


def test_zero_gates_bfloat16_and_strong_gates():
    _check((1, 150, 1, 32, 32), jnp.bfloat16, with_state=True, final_state=True, segments=True, seed=8,
           zeros="several_in_chunk")
    _check((1, 150, 1, 32, 32), jnp.float32, with_state=True, final_state=True, segments=False, gate="strong",
           seed=9, zeros="chunk_boundary")


@pytest.mark.parametrize("name", ["v", "g"])
def test_non_finite_input_reach(name):
    """The operator's contract (gla's docstring): a NaN at position t = 100 poisons its row and head from the start of
    its chunk (64) on; earlier positions, other rows and heads are bit-for-bit as without it."""
    q, k, v, g, h0, _, _, _ = kernel_inputs(2, 200, 2, 16, 16, jnp.float32, 13)
    assert_non_finite_reach(chunk_gla, (q, k, v, g, h0), name, t=100, chunk=64)


def test_large_heads_small_t():
    """K=256, V=512 (the 1.3B model's head sizes): several K and V tiles."""
    _check((1, 40, 1, 256, 512), jnp.float32, with_state=True, final_state=True, segments=True)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [32, 128])
def test_other_chunk_sizes(chunk_size):
    _check((1, 150, 1, 32, 64), jnp.float32, with_state=True, final_state=True, segments=True,
           chunk_size=chunk_size)


@pytest.mark.slow
def test_bfloat16_large_heads():
    _check((1, 200, 2, 128, 128), jnp.bfloat16, with_state=True, final_state=True, segments=False, seed=1)


@pytest.mark.slow
def test_bfloat16_k256_v512():
    _check((1, 72, 1, 256, 512), jnp.bfloat16, with_state=True, final_state=True, segments=True, seed=2)


def test_matches_recurrent_op_and_dispatch():
    """Against the library's own recurrent form, and through gla(impl="triton", interpret=True) and its "pallas"
    alias."""
    from gla_jax.ops import gla

    q, k, v, g, h0, seg, _, _ = kernel_inputs(1, 90, 2, 32, 32, jnp.float32, 3, segments=True)
    args = [jnp.asarray(x) for x in (q, k, v, g)]
    kw = dict(initial_state=jnp.asarray(h0), output_final_state=True, segment_ids=jnp.asarray(seg))
    ro, rs = gla(*args, impl="recurrent", **kw)
    o, s = jax.jit(lambda *a: chunk_gla(*a, interpret=True, **kw))(*args)
    assert rel_err(o, ro) <= F32_TOL and rel_err(s, rs) <= F32_TOL
    for impl in ("triton", "pallas"):
        po, ps = gla(*args, impl=impl, interpret=True, **kw)
        assert rel_err(po, ro) <= F32_TOL and rel_err(ps, rs) <= F32_TOL


# ------------------------------------------------------------------------------------------ CUDA lowering on CPU


def _abstract_args(B, T, H, K, V, dtype):
    sd = jax.ShapeDtypeStruct
    return (sd((B, T, H, K), dtype), sd((B, T, H, K), dtype), sd((B, T, H, V), dtype), sd((B, T, H, K), dtype),
            sd((B, H, K, V), jnp.float32), sd((B, T), jnp.int32))


def _fwd(q, k, v, g, h0, seg):
    return chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, segment_ids=seg)


def _loss(q, k, v, g, h0, seg):
    o, s = _fwd(q, k, v, g, h0, seg)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)


@pytest.mark.parametrize("K, V", [(128, 256), (256, 512)])
def test_lowers_for_cuda_bf16(K, V):
    args = _abstract_args(2, 1000, 4, K, V, jnp.bfloat16)
    fwd = lower_for_cuda(_fwd, *args)
    assert triton_kernel_count(fwd) == 3  # state pass, intra-chunk A, output
    bwd = lower_for_cuda(jax.grad(_loss, argnums=(0, 1, 2, 3, 4)), *args)
    assert triton_kernel_count(bwd) == 8  # forward 3 + state recompute, state grads, dA, dv, dq/dk
    # Without segments the kernels are specialised (no document masks) and must lower as well.
    nseg = lambda q, k, v, g, h0, seg: chunk_gla(q, k, v, g)[0]
    assert triton_kernel_count(lower_for_cuda(jax.grad(lambda *a: nseg(*a).astype(jnp.float32).sum(),
                                                       argnums=(0, 1, 2, 3)), *args)) == 8


def test_lowers_for_cuda_float32():
    """float32 inputs: the matmuls are float32-accurate (TF32x3 on the GPU, not Triton's TF32 default), and that
    must lower too."""
    args = _abstract_args(1, 200, 2, 64, 64, jnp.float32)
    assert triton_kernel_count(lower_for_cuda(jax.grad(_loss, argnums=(0, 1, 2, 3, 4)), *args)) == 8


def test_cuda_lowering_really_checks_triton_rules():
    """A kernel that breaks a Triton rule (a 24-row block) must fail lower_for_cuda, so the tests above mean
    something; the same kernel with 32 rows lowers."""

    def make(n):
        def kernel(x_ref, o_ref):
            o_ref[...] = jnp.exp(x_ref[...])

        return lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(1,),
                                        in_specs=[pl.BlockSpec((n, 32), lambda i: (0, 0))],
                                        out_specs=pl.BlockSpec((n, 32), lambda i: (0, 0)),
                                        compiler_params=compiler_params(num_warps=4, num_stages=1))(x)

    assert triton_kernel_count(lower_for_cuda(make(32), jax.ShapeDtypeStruct((32, 32), jnp.float32))) == 1
    with pytest.raises(Exception, match="power of 2"):
        lower_for_cuda(make(24), jax.ShapeDtypeStruct((24, 32), jnp.float32))


# ------------------------------------------------------------------------------ machine code for sm_90 on CPU


def _machine_code(K, V, dtype):
    pytest.importorskip("triton")  # installed with the [torch] extra (CI); needs no GPU
    from gla_jax.kernels.triton.lowering import triton_modules
    from gla_jax.kernels.triton.machine_code import compile_module

    args = _abstract_args(1, 256, 2, K, V, dtype)
    modules = triton_modules(lower_for_cuda(jax.grad(_loss, argnums=(0, 1, 2, 3, 4)), *args))
    return {m.name: compile_module(m, arch=90) for m in modules}


@pytest.mark.slow  # ~30 s each: Triton compiles 7 kernels to sm_90 machine code
@pytest.mark.parametrize("K, V", [(128, 256), (256, 512)])
def test_kernels_fit_sm90_without_spills(K, V):
    """At the paper's head sizes in bf16 every kernel fits the H100/H200 per-block shared memory and keeps its
    values in registers (a spill to local memory costs speed; the unrolled kernels of an earlier version spilled
    ~2 KB and took minutes to compile)."""
    from gla_jax.kernels.triton.machine_code import SM90_MAX_SHARED_BYTES

    code = _machine_code(K, V, jnp.bfloat16)
    assert set(code) == {"gla_state_fwd", "gla_intra_fwd", "gla_output_fwd", "gla_state_bwd", "gla_attn_bwd",
                         "gla_dv_bwd", "gla_dqk_bwd"}
    for mc in code.values():
        assert 0 < mc.shared_bytes <= SM90_MAX_SHARED_BYTES, mc
        assert mc.spill_store_bytes == 0 and mc.spill_load_bytes == 0, mc
        assert 0 < mc.registers <= 255 and mc.ptx_lines < 20_000, mc


@pytest.mark.slow  # ~40 s of Triton compiles
def test_machine_code_sees_spills_and_shared_memory():
    """compile_module really measures: a kernel holding a [128, 256] float32 tile per program (32K values for 128
    threads) must report spills, and a kernel staging a large matmul must report shared memory."""
    pytest.importorskip("triton")
    from gla_jax.kernels.triton.lowering import triton_modules
    from gla_jax.kernels.triton.machine_code import compile_module

    def big(x_ref, o_ref):  # x and the carry live together: 512 float32 values a thread
        x = x_ref[...]
        o_ref[...] = jax.lax.fori_loop(0, 4, lambda i, o: o * jnp.exp(x) + jnp.max(o, axis=0, keepdims=True), x)

    def matmul(a_ref, b_ref, o_ref):
        o_ref[...] = jnp.dot(a_ref[...], b_ref[...], preferred_element_type=jnp.float32)

    sd = jax.ShapeDtypeStruct
    spill = lambda x: pl.pallas_call(big, out_shape=sd(x.shape, x.dtype),
                                     compiler_params=compiler_params(num_warps=4, num_stages=1))(x)
    mm = lambda a, b: pl.pallas_call(matmul, out_shape=sd((128, 128), jnp.float32),
                                     compiler_params=compiler_params(num_warps=4, num_stages=1))(a, b)
    [m1] = triton_modules(lower_for_cuda(spill, sd((128, 256), jnp.float32)))
    [m2] = triton_modules(lower_for_cuda(mm, sd((128, 128), jnp.bfloat16), sd((128, 128), jnp.bfloat16)))
    heavy, dense = compile_module(m1), compile_module(m2)
    assert heavy.spill_store_bytes > 0 and heavy.spill_load_bytes > 0, heavy
    assert dense.shared_bytes >= 2 * 128 * 128 * 2 // 2 and dense.spill_store_bytes == 0, dense


# ------------------------------------------------------------------------------------------------------ inputs


def test_bad_inputs_raise_value_error():
    q = jnp.zeros((1, 8, 2, 16))
    v = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="^k:"):
        chunk_gla(q, jnp.zeros((1, 8, 2, 8)), v, q)
    with pytest.raises(ValueError, match="^v:"):
        chunk_gla(q, q, jnp.zeros((1, 9, 2, 16)), q)
    with pytest.raises(ValueError, match="^q:"):
        chunk_gla(jnp.zeros((8, 2, 16)), q, v, q)
    with pytest.raises(ValueError, match="^initial_state:"):
        chunk_gla(q, q, v, q, initial_state=jnp.zeros((1, 2, 16, 8)))
    with pytest.raises(ValueError, match="^segment_ids:"):
        chunk_gla(q, q, v, q, segment_ids=jnp.zeros((1, 8), jnp.float32))
    with pytest.raises(ValueError, match="^chunk_size:"):
        chunk_gla(q, q, v, q, chunk_size=48)
    with pytest.raises(ValueError, match="^matmul_dtype:"):
        chunk_gla(q, q, v, q, matmul_dtype=jnp.int8)
    with pytest.raises(ValueError, match="^matmul_dtype:"):
        chunk_gla(q, q, v, q, matmul_dtype="float31")
    with pytest.raises(ValueError, match="^g:"):
        chunk_gla(q, q, v, jnp.zeros((1, 8, 2, 16), jnp.int32))
