"""Mosaic GPU GLA kernels (gla_jax.kernels.mosaic_gpu) without a GPU: Mosaic GPU interpret mode (race detection on)
against the float64 recurrence and against numpy, and lowering for CUDA on the CPU (Mosaic GPU's own passes run and
reject bad tilings, swizzles and shared memory over 227 KiB). Every numeric test has a compiled twin that runs on a
Hopper GPU (compute capability >= 9.0) when one is present and is skipped otherwise."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gla_jax.kernels.mosaic_gpu import chunk_gla
from gla_jax.kernels.mosaic_gpu.compat import races_found
from gla_jax.kernels.mosaic_gpu.products import chunk_products
from gla_jax.kernels.mosaic_gpu.states import state_pass
from gla_jax.kernels.mosaic_gpu.tiles import SMEM_LIMIT_BYTES, check_smem, smem_bytes
from kernel_checks import assert_matches_reference, kernel_inputs
from reference import reference_gla, rel_err

TOL = 4e-3  # bf16/fp16 inputs; fla's own bound for bf16 chunk vs naive is 4e-3..5e-3


def _hopper() -> bool:
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return False
    return bool(devices) and float(getattr(devices[0], "compute_capability", "0")) >= 9.0


#: "interpret": Mosaic GPU interpret mode on the CPU; "gpu": compiled, on a Hopper GPU only.
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU"))]


# one cut of the segment ids on the chunk boundary 64; the gates stay float32 (not rounded to the input dtype)
_inputs = functools.partial(kernel_inputs, boundary=64, round_gates=False)


def _assert_no_races(capfd):
    """The interpreter prints "RACE DETECTED" for every race it sees (its races_found flag only covers the last
    kernel launched, so the printed report is what covers all of them)."""
    out, err = capfd.readouterr()
    assert "RACE DETECTED" not in out + err, (out + err)[-3000:]
    assert not races_found()


def _check(case, dtype, interpret, capfd, *, with_state=True, final_state=True, segments=True, gate="layer", seed=0):
    q, k, v, g, h0, seg, do, dst = _inputs(*case, dtype, seed, gate=gate, segments=segments)
    seg_j = None if seg is None else jnp.asarray(seg)

    def f(q, k, v, g, h0):
        return chunk_gla(q, k, v, g, initial_state=h0 if with_state else None, output_final_state=final_state,
                         segment_ids=seg_j, interpret=interpret)

    cast = lambda x: jnp.asarray(x, dtype)
    (o, s), vjp = jax.vjp(f, cast(q), cast(k), cast(v), jnp.asarray(g), jnp.asarray(h0))
    grads = vjp((cast(do), jnp.asarray(dst) if final_state else None))
    errs = assert_matches_reference(o, s, grads, (q, k, v, g, h0, seg, do, dst), dtype=dtype, with_state=with_state,
                                    final_state=final_state, tol=TOL)
    if interpret:
        _assert_no_races(capfd)
    return errs


# ------------------------------------------------------------------------------------ the kernels one by one


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("reverse", [False, True])
def test_state_pass_matches_numpy(interpret, reverse, capfd):
    """Both directions of the sequential state pass: chunk-start states (bf16) and the final state (float32)."""
    B, H, N, K, C, V = 1, 1, 3, 64, 64, 128
    rng = np.random.default_rng(int(reverse))
    xt = jnp.asarray(rng.standard_normal((B, H, N, K, C)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((B, H, N, C, V)), jnp.bfloat16)
    d = jnp.asarray(rng.uniform(0.0, 1.0, (B, H, N, K)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    starts, final = state_pass(xt, y, d, s0, reverse=reverse, interpret=interpret, staged=interpret)
    f64 = lambda x: np.asarray(x, np.float64)
    s, ref = f64(s0), [None] * N
    for n in (reversed(range(N)) if reverse else range(N)):
        ref[n] = s
        s = s * f64(d[:, :, n])[..., None] + np.einsum("bhkc,bhcv->bhkv", f64(xt[:, :, n]), f64(y[:, :, n]))
    assert rel_err(starts, np.stack(ref, 2)) < 4e-3  # bf16 rounding of the stored states
    assert rel_err(final, s) < 1e-6  # float32 accumulation
    if interpret:
        _assert_no_races(capfd)


@pytest.mark.parametrize("interpret", MODES)
def test_chunk_products_match_numpy(interpret, capfd):
    B, H, N, K, C, V = 1, 2, 1, 128, 64, 128
    rng = np.random.default_rng(2)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
    p, y, q, s = r(B, H, N, C, C), r(B, H, N, C, V), r(B, H, N, C, K), r(B, H, N, K, V)
    out = chunk_products(p, y, q, s, out_dtype=jnp.float32, interpret=interpret)
    f64 = lambda x: np.asarray(x, np.float64)
    assert rel_err(out, f64(p) @ f64(y) + f64(q) @ f64(s)) < 1e-6
    if interpret:
        _assert_no_races(capfd)


def test_race_detection_catches_a_missing_barrier_wait(capfd):
    """Positive control for the race checks above: reading SMEM that a TMA copy is still filling (the barrier wait
    moved after the read) is reported; with the wait in place it is not."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from gla_jax.kernels.mosaic_gpu import compat

    def make(wait_first):
        def body(x_ref, o_ref, x_smem, bar):
            plgpu.copy_gmem_to_smem(x_ref, x_smem, bar)
            if wait_first:
                plgpu.barrier_wait(bar)
            x_smem[...] = x_smem[...] * 2.0
            if not wait_first:
                plgpu.barrier_wait(bar)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(x_smem, o_ref)
            plgpu.wait_smem_to_gmem(0)

        return compat.kernel(body, out=jax.ShapeDtypeStruct((64, 64), jnp.float32),
                             scratch=(plgpu.SMEM((64, 64), jnp.float32), plgpu.Barrier(num_arrivals=1)),
                             interpret=compat.interpret_params(True))

    x = jnp.ones((64, 64), jnp.float32)
    np.testing.assert_array_equal(np.asarray(make(True)(x)), 2.0)
    _assert_no_races(capfd)
    make(False)(x).block_until_ready()
    assert races_found()
    assert "RACE DETECTED" in capfd.readouterr().out


# ------------------------------------------------------------------------------ chunk_gla vs the float64 recurrence


@pytest.mark.parametrize("interpret", MODES)
def test_bfloat16_segments_initial_and_final_state(interpret, capfd):
    """Odd T (two chunks, the second partly padding), K and V padded to 64, three documents, an initial state and
    the final state's cotangent: output, final state and all five gradients."""
    _check((1, 100, 1, 32, 48), jnp.bfloat16, interpret, capfd)


@pytest.mark.slow
@pytest.mark.parametrize("interpret", MODES)
def test_float16_no_segments(interpret, capfd):
    _check((1, 90, 1, 40, 24), jnp.float16, interpret, capfd, segments=False, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("interpret", MODES)
def test_bfloat16_no_state_two_heads_wide_v(interpret, capfd):
    """Two heads, a batch of two, V padded to 128 (two 64-wide V slices per block)."""
    _check((2, 70, 2, 16, 72), jnp.bfloat16, interpret, capfd, with_state=False, final_state=False, seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("interpret", MODES)
def test_strong_gates_stay_finite_and_exact(interpret, capfd):
    """Per-step gates down to -20: every exponent stays <= 0, nothing overflows."""
    _check((1, 80, 1, 16, 16), jnp.bfloat16, interpret, capfd, gate="strong", seed=3)


@pytest.mark.parametrize("interpret", MODES)
def test_zero_gates_match_the_recurrence(interpret):
    """g = -inf (a gate of exactly zero) forgets the state: finite outputs equal to the recurrence's."""
    q, k, v, g, h0, *_ = _inputs(1, 70, 1, 16, 16, jnp.bfloat16, 4, segments=False)
    g[:, 10] = -np.inf
    g[:, 66, :, :4] = -np.inf
    cast = lambda x: jnp.asarray(x, jnp.bfloat16)
    o, s = chunk_gla(cast(q), cast(k), cast(v), jnp.asarray(g), initial_state=jnp.asarray(h0),
                     output_final_state=True, interpret=interpret)
    ro, rs = reference_gla(q, k, v, g, initial_state=h0)
    assert np.all(np.isfinite(np.asarray(o, np.float32))) and np.all(np.isfinite(np.asarray(s)))
    assert rel_err(o, ro) < TOL and rel_err(s, rs) < TOL


@pytest.mark.parametrize("kw, name", [
    (dict(interpret="yes"), "interpret"),
    (dict(staged="no"), "staged"),
    (dict(chunk_size=128), "chunk_size"),
    (dict(chunk_size=48), "chunk_size"),
])
def test_bad_arguments_name_themselves(kw, name):
    q = jnp.zeros((1, 8, 1, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=f"^{name}:"):
        chunk_gla(q, q, q, q, **kw)


def test_missing_interpret_mode_is_a_one_line_error(monkeypatch):
    """A jax whose Mosaic GPU interpret mode lives elsewhere: interpret=True says so instead of failing deep inside."""
    from gla_jax.kernels.mosaic_gpu import compat

    monkeypatch.setattr(compat, "interpret_class", lambda: None)
    q = jnp.zeros((1, 8, 1, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="^interpret: this jax .* has no Mosaic GPU interpret mode"):
        chunk_gla(q, q, q, q, interpret=True)


def test_float32_inputs_are_refused():
    """wgmma takes 16-bit operands here; float32 inputs get a one-line error pointing at the Triton kernels."""
    q = jnp.zeros((1, 8, 1, 16), jnp.float32)
    with pytest.raises(ValueError, match="^q: .*bfloat16 or float16.*impl='triton'"):
        chunk_gla(q, q, q, q)
    b = q.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="^v: "):
        chunk_gla(b, b, b.astype(jnp.float16), q)


# ------------------------------------------------------------------------------ shared memory and CUDA lowering


def test_smem_budget_fits_up_to_k256_and_refuses_wider():
    for K in (64, 128, 256):
        for dtype in (jnp.bfloat16, jnp.float16):
            assert all(0 < n <= SMEM_LIMIT_BYTES for n in check_smem(K, dtype).values())
    with pytest.raises(ValueError, match=r"^q: head dim 320 .* KiB of shared memory"):
        check_smem(320, jnp.bfloat16)
    q = jnp.zeros((1, 8, 1, 300), jnp.bfloat16)
    with pytest.raises(ValueError, match="^q: head dim 320"):
        chunk_gla(q, q, q, q)


def _lower_fwd_bwd(K, V, *, T=256, H=2, dtype=jnp.bfloat16):
    sd = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)
    args = [sd(1, T, H, K), sd(1, T, H, K), sd(1, T, H, V), sd(1, T, H, K, dt=jnp.float32),
            sd(1, H, K, V, dt=jnp.float32), sd(1, T, dt=jnp.int32)]

    def loss(q, k, v, g, h0, seg):
        o, s = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, segment_ids=seg)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    return f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("K, V, dtype", [(64, 64, jnp.bfloat16), (128, 256, jnp.bfloat16), (256, 512, jnp.bfloat16),
                                         (128, 256, jnp.float16)])
def test_forward_and_backward_lower_for_cuda(K, V, dtype):
    """Mosaic GPU compiles all four kernels (state pass and products, forward and backward) down to NVVM on the
    CPU: tilings, swizzles, wgmma shapes and the shared-memory budget are checked; only PTX is left for a GPU.
    (K, V) = (128, 256) are GLA-340M's heads, (256, 512) GLA-1.3B's."""
    text = _lower_fwd_bwd(K, V, dtype=dtype)
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 4
    assert "nvvm.wgmma" in text


def test_lowering_rejects_shared_memory_over_the_limit():
    """Negative control: the lowering check is real. Three pipeline slots in the state pass at K=256 need more
    than 227 KiB, and Mosaic refuses, with exactly the figure ``tiles.smem_bytes`` computes; two slots lower."""
    K, C, V = 256, 64, 64
    sd = jax.ShapeDtypeStruct
    args = (sd((1, 1, 4, K, C), jnp.bfloat16), sd((1, 1, 4, C, V), jnp.bfloat16), sd((1, 1, 4, K), jnp.float32),
            sd((1, 1, K, V), jnp.float32))

    def lower(stages):
        f = lambda *a: state_pass(*a, reverse=False, interpret=False, staged=False, stages=stages)
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))

    with pytest.raises(ValueError, match="exceeds available shared memory") as err:
        lower(3)
    assert int(re.search(r"smem_bytes=(\d+)", str(err.value)).group(1)) == smem_bytes("states", K, jnp.bfloat16,
                                                                                      stages=3)
    assert smem_bytes("states", K, jnp.bfloat16, stages=2) <= SMEM_LIMIT_BYTES
    lower(2)


# ------------------------------------------------------------------------------- experiments/gpu_check.py (e)


@pytest.mark.slow  # ~2 min of interpret mode (compiles and runs the kernels for the check and the timings)
def test_gpu_check_mosaic_section_in_interpret_mode(tmp_path):
    """gpu_check's Mosaic GPU section on the CPU: correct against impl='chunk', both timing rows, goals present
    but not claimed."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.join(repo, "experiments", "gpu_check.py"), "--interpret",
                           "--out", str(tmp_path), "--T", "64", "--skip-check", "--skip-bench",
                           "--tune-budget-s", "0"], capture_output=True, text=True, env=env, timeout=900, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    section = json.loads((tmp_path / "gpu_check.json").read_text())["mosaic_gpu"]
    (entry,) = section["correctness"]
    assert entry["ok"] and set(entry["rel_err"]) == {"o", "final_state", "dq", "dk", "dv", "dg", "dh0"}
    assert {(r["impl"], r["mode"]) for r in section["timings"]} == {("mosaic_gpu", "fwd"), ("mosaic_gpu", "fwdbwd")}
    assert all(t["met"] is None for t in section["targets"])
    assert "RACE DETECTED" not in proc.stdout


def test_gpu_check_mosaic_goals():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "gpu_check.py")
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [{"impl": "fla_chunk_gla", "T": 4096, "mode": "fwdbwd", "ms": 10.0},
            {"impl": "fla_chunk_gla", "T": 8192, "mode": "fwdbwd", "ms": 20.0},
            {"impl": "cudnn_attention", "T": 8192, "mode": "fwdbwd", "ms": 20.0}]
    goals = mod.mosaic_goals(rows + [{"impl": "mosaic_gpu", "T": 4096, "mode": "fwdbwd", "ms": 6.0},
                                     {"impl": "mosaic_gpu", "T": 8192, "mode": "fwdbwd", "ms": 16.0}], interpret=False)
    res = {(g["T"], g["target"].split()[-1]): g for g in goals}
    assert res[(4096, "fla_chunk_gla")]["ratio"] == 0.6 and res[(4096, "fla_chunk_gla")]["met"] is True
    assert res[(8192, "fla_chunk_gla")]["ratio"] == 0.8 and res[(8192, "fla_chunk_gla")]["met"] is False
    assert res[(8192, "cudnn_attention")]["ratio"] == 0.8 and res[(8192, "cudnn_attention")]["met"] is False
    assert set(res) == {(4096, "fla_chunk_gla"), (8192, "fla_chunk_gla"), (8192, "cudnn_attention")}
