"""Mosaic TPU GLA kernels (gla_jax.kernels.mosaic_tpu) without a TPU: TPU interpret mode (race detection on,
uninitialised VMEM filled with NaN) against the float64 recurrence, export for TPU on the CPU (the Pallas TPU
lowering checks every block against the (8, 128) tiling rule), and the VMEM footprint of each shipped tiling
against its generation's scoped limit."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gla_jax.kernels.mosaic_tpu import Tiling, check_vmem, chunk_gla, vmem_bytes
from gla_jax.kernels.mosaic_tpu import forward as tpu_forward
from gla_jax.kernels.mosaic_tpu.tiling import SCOPED_VMEM_BYTES
from kernel_checks import assert_matches_reference, assert_non_finite_reach, assert_zero_gates_exact, kernel_inputs
from reference import reference_gla, rel_err
from zero_gates import PATTERNS, place_zero_gates

F32_TOL = 1e-4
BF16_TOL = 4e-3  # fla's own bound for bf16 chunk vs naive is 4e-3..5e-3


def _races_found() -> bool:
    """The interpreter's race detector flag (set when any kernel run with detect_races=True saw a race)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # private: no public accessor yet

    races = getattr(ipc, "races", None)
    return bool(getattr(races, "races_found", False))


# one cut of the segment ids on the chunk boundary 128 (the default chunk)
_inputs = functools.partial(kernel_inputs, boundary=128)


def _check(case, dtype, *, with_state, final_state, segments, gate="layer", seed=0, zeros=None, **kw):
    """Kernels (interpret mode) vs float64 recurrence, forward and every gradient; ``zeros``: a
    ``zero_gates.PATTERNS`` placement of zero gates (then dg must also be exactly 0 at each of them)."""
    q, k, v, g, h0, seg, do, dst = _inputs(*case, dtype, seed, gate=gate, segments=segments)
    if zeros is not None:
        g = place_zero_gates(g, zeros, seed=seed)
    seg_j = None if seg is None else jnp.asarray(seg)

    def f(q, k, v, g, h0):
        return chunk_gla(q, k, v, g, initial_state=h0 if with_state else None, output_final_state=final_state,
                         segment_ids=seg_j, interpret=True, **kw)

    cast = lambda x: jnp.asarray(x, dtype)
    (o, s), vjp = jax.vjp(f, cast(q), cast(k), cast(v), cast(g), jnp.asarray(h0))
    grads = vjp((cast(do), jnp.asarray(dst) if final_state else None))
    errs = assert_matches_reference(o, s, grads, (q, k, v, g, h0, seg, do, dst), dtype=dtype, with_state=with_state,
                                    final_state=final_state, tol=F32_TOL if dtype == jnp.float32 else BF16_TOL)
    assert not _races_found()
    if zeros is not None:
        assert_zero_gates_exact(grads[3], g)
    return errs


# ----------------------------------------------------------------------------------- interpret mode vs float64

# (B, T, H, K, V): odd T (2 chunks of 128, the second partly padding), K and V not multiples of 128.
def test_float32_initial_and_final_state():
    _check((1, 200, 2, 32, 48), jnp.float32, with_state=True, final_state=True, segments=False)


def test_float32_segments():
    _check((2, 150, 1, 40, 24), jnp.float32, with_state=True, final_state=True, segments=True, seed=1)


def test_bfloat16_segments_no_state():
    _check((1, 200, 2, 32, 64), jnp.bfloat16, with_state=False, final_state=False, segments=True, seed=2)


def test_bfloat16_initial_and_final_state():
    _check((1, 140, 1, 64, 32), jnp.bfloat16, with_state=True, final_state=True, segments=True, seed=3)


def test_strong_gates_stay_exact():
    """Per-step gates down to -20: every exponent stays <= 0, nothing overflows, still float32-exact."""
    _check((1, 160, 1, 16, 16), jnp.float32, with_state=True, final_state=True, segments=True, gate="strong",
           seed=4)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_zero_gates_match_reference(pattern):
    """alpha = 0 (g = -inf or far below the floor) clears the state exactly as the recurrence does (chunk 128:
    the "chunk_boundary" pattern puts zero gates at 127 and 128), forward and every gradient finite and exact."""
    _check((1, 150, 2, 16, 16), jnp.float32, with_state=True, final_state=True, segments=True, seed=10,
           zeros=pattern)


def test_zero_gates_bfloat16_and_strong_gates():
    _check((1, 150, 1, 16, 16), jnp.bfloat16, with_state=True, final_state=True, segments=True, seed=11,
           zeros="several_in_chunk")
    _check((1, 150, 1, 16, 16), jnp.float32, with_state=True, final_state=True, segments=False, gate="strong",
           seed=12, zeros="chunk_boundary")


@pytest.mark.parametrize("name", ["v", "g"])
def test_non_finite_input_reach(name):
    """The operator's contract (gla's docstring): a NaN at position t = 150 poisons its row and head from the start of
    its chunk (128) on; earlier positions, other rows and heads are bit-for-bit as without it."""
    q, k, v, g, h0, _, _, _ = _inputs(2, 200, 2, 16, 16, jnp.float32, 13)
    assert_non_finite_reach(chunk_gla, (q, k, v, g, h0), name, t=150, chunk=128)


@pytest.mark.slow
def test_chunk_256_sub_chunk_32():
    """The v6e-sized chunk (256, one MXU tile) with 32-row sub-chunks: same results."""
    _check((1, 300, 1, 32, 32), jnp.float32, with_state=True, final_state=True, segments=True, seed=5,
           chunk_size=256, sub_chunk=32, generation="v6e")


@pytest.mark.slow
def test_bfloat16_k256_v512():
    _check((1, 130, 1, 256, 512), jnp.bfloat16, with_state=True, final_state=True, segments=True, seed=6)


def test_operator_chunk_size_runs_at_lane_width():
    """chunk_size=64 (the operator's default) runs with 128: the same output as chunk_size=128."""
    q, k, v, g, *_ = _inputs(1, 40, 1, 16, 16, jnp.float32, 7)
    a, _ = chunk_gla(q, k, v, g, interpret=True, chunk_size=64)
    b, _ = chunk_gla(q, k, v, g, interpret=True, chunk_size=128)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert rel_err(a, reference_gla(q, k, v, g)[0]) < F32_TOL


@pytest.mark.parametrize("kw, name", [
    (dict(interpret="yes"), "interpret"),
    (dict(sub_chunk=24), "sub_chunk"),
    (dict(generation="v99"), "generation"),
    (dict(chunk_size=100), "chunk_size"),
])
def test_bad_arguments_name_themselves(kw, name):
    q = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(ValueError, match=f"^{name}:"):
        chunk_gla(q, q, q, q, **kw)


# ----------------------------------------------------------------------------------------------- export for TPU


def _export_fwd_bwd(K, V, *, T=256, H=2, segments=True):
    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
    args = [sd(1, T, H, K), sd(1, T, H, K), sd(1, T, H, V), sd(1, T, H, K, dt=jnp.float32),
            sd(1, H, K, V, dt=jnp.float32)]
    seg = sd(1, T, dt=jnp.int32) if segments else None

    def loss(q, k, v, g, h0, seg):
        o, s = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, segment_ids=seg)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    return jax.export.export(f, platforms=["tpu"])(*args, seg).mlir_module()


@pytest.mark.parametrize("K, V", [(128, 256), (256, 512)])
@pytest.mark.parametrize("segments", [False, True])
def test_exports_for_tpu_bfloat16(K, V, segments):
    """Forward and backward lower for TPU (Mosaic custom calls for all three kernels) at the paper's head sizes."""
    text = _export_fwd_bwd(K, V, segments=segments)
    assert set(re.findall(r"gla_tpu_\w+", text)) >= {"gla_tpu_fwd", "gla_tpu_states", "gla_tpu_bwd"}


def test_export_rejects_a_bad_block_shape():
    """Negative control: the export check is real. Unpadded K=64 gives a (128, 64) block that breaks the
    (8, 128) rule, and exporting the same forward kernel fails."""
    B, T, H, K, V = 1, 256, 2, 64, 128
    sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)

    def f(q, k, v, gc, zc, decay, h0):
        return tpu_forward.forward(q, k, v, gc, zc, decay, h0, None, H=H, scale=0.1, tiling=Tiling(),
                                   interpret=False)

    args = (sd(B, T, H * K), sd(B, T, H * K), sd(B, T, H * V), sd(B, T, H * K, dt=jnp.float32),
            sd(B, T, H * K, dt=jnp.float32), sd(B, T // 128, H * K, 1, dt=jnp.float32), sd(B, H, K, V, dt=jnp.float32))
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        jax.export.export(jax.jit(f), platforms=["tpu"])(*args)
    good = (sd(B, T, H * 128), sd(B, T, H * 128), *args[2:3], sd(B, T, H * 128, dt=jnp.float32),
            sd(B, T, H * 128, dt=jnp.float32), sd(B, T // 128, H * 128, 1, dt=jnp.float32),
            sd(B, H, 128, V, dt=jnp.float32))
    jax.export.export(jax.jit(f), platforms=["tpu"])(*good)  # the same call padded to 128 exports


# ------------------------------------------------------------------------------------------------- VMEM budget

#: The tilings the kernels ship with: (generation, chunk_size, sub_chunk) at both paper head sizes.
SHIPPED = [("v5e", 128, 16), ("v5p", 128, 16), ("v6e", 128, 16), ("v6e", 256, 32)]


@pytest.mark.parametrize("generation, C, c", SHIPPED)
@pytest.mark.parametrize("K, V", [(128, 256), (256, 512)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_vmem_estimate_fits_scoped_limit(generation, C, c, K, V, dtype):
    tiling = Tiling(chunk_size=C, sub_chunk=c, generation=generation)
    est = check_vmem(tiling, K, V, dtype)
    limit = SCOPED_VMEM_BYTES[generation]
    for kernel, n in est.items():
        # at least the float32 state scratch and its double-buffered float32 input (h0 / dht), at most the limit
        assert 3 * K * V * 4 <= n <= limit, (kernel, n, limit)
    assert est["backward"] > est["forward"] > est["states"]


def test_vmem_estimate_counts_tiles():
    """A [C, 1] block occupies [C, 128] lanes; bfloat16 rows pack in 16s: the estimate follows the TPU layout."""
    from gla_jax.kernels.mosaic_tpu.tiling import tile_bytes

    assert tile_bytes((128, 1), jnp.int32) == 128 * 128 * 4
    assert tile_bytes((1, 128), jnp.int32) == 8 * 128 * 4
    assert tile_bytes((8, 128), jnp.bfloat16) == 16 * 128 * 2
    assert tile_bytes((256, 512), jnp.float32) == 256 * 512 * 4


def test_vmem_over_limit_names_chunk_size():
    tiling = Tiling(chunk_size=1024, sub_chunk=16, generation="v5e")
    assert vmem_bytes("backward", tiling, 256, 512, jnp.bfloat16) > SCOPED_VMEM_BYTES["v5e"]
    with pytest.raises(ValueError, match=r"^chunk_size: 1024 needs ~[\d.]+ MiB of VMEM"):
        check_vmem(tiling, 256, 512, jnp.bfloat16)
    q = jnp.zeros((1, 8, 1, 256))
    with pytest.raises(ValueError, match="^chunk_size:"):
        chunk_gla(q, q, jnp.zeros((1, 8, 1, 512)), q, chunk_size=1024)


# ------------------------------------------------------------------------------------- experiments/tpu_check.py


def _tpu_check():
    import importlib.util
    import os
    import sys

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    sys.path.insert(0, here)  # tpu_check imports its sibling gpu_check
    try:
        spec = importlib.util.spec_from_file_location("tpu_check", os.path.join(here, "tpu_check.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(here)
    return mod


@pytest.mark.slow  # ~25 s of CPU (interpret mode compiles and runs every kernel twice), more on a loaded machine
def test_tpu_check_interpret_smoke(tmp_path):
    """The --interpret path end to end at tiny sizes: both dtypes correct, every timing row present, the VMEM
    estimates recorded, no speed claims."""
    import json
    import os
    import subprocess
    import sys

    # A fresh process: the worker that runs this test may already have imported optax/orbax for other tests, and the
    # report's heavy_modules_imported must describe the check alone.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.join(repo, "experiments", "tpu_check.py"), "--interpret",
                           "--out", str(tmp_path), "--T", "128"], capture_output=True, text=True, env=env,
                          timeout=900, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "tpu_check.json").read_text())
    assert report["interpret"] is True and report["generation"] == "v5e"
    assert report["heavy_modules_imported"] == []
    assert [e["dtype"] for e in report["correctness"]] == ["float32", "bfloat16"]
    for e in report["correctness"]:
        assert e["ok"] and e["finite"] and set(e["rel_err"]) == {"o", "final_state", "dq", "dk", "dv", "dg", "dh0"}
    got = {(r["impl"], r["mode"]) for r in report["timings"]}
    assert got == {(i, m) for i in ("mosaic_tpu", "chunk_xla", "xla_attention") for m in ("fwd", "fwdbwd")}
    assert any(s["impl"] == "splash_attention" for s in report["skipped"])
    assert all(t["met"] is None for t in report["targets"])
    limit = report["scoped_vmem_limit_bytes"]
    assert all(0 < n <= limit for per in report["vmem_estimate_bytes"].values() for n in per.values())


def test_tpu_check_targets_and_generation():
    mod = _tpu_check()
    assert [mod.generation_of(k) for k in ("TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU v4")] == [
        "v5e", "v5p", "v6e", "v4"]
    rows = [
        {"impl": "mosaic_tpu", "T": 8192, "mode": "fwdbwd", "ms": 10.0},
        {"impl": "chunk_xla", "T": 8192, "mode": "fwdbwd", "ms": 20.0},
        {"impl": "splash_attention", "T": 8192, "mode": "fwdbwd", "ms": 8.0},
    ]
    res = {t["target"].split()[-1]: t for t in mod.evaluate_targets(rows, interpret=False)}
    assert res["chunk_xla"]["ratio"] == 0.5 and res["chunk_xla"]["met"] is True
    assert res["splash_attention"]["ratio"] == 1.25 and res["splash_attention"]["met"] is False


@pytest.mark.parametrize("nproc, warns", [("2", True), ("8", True), ("16", False)])
def test_interpret_under_cpu_mesh_warns_when_the_pool_can_deadlock(monkeypatch, nproc, warns):
    """Traced under a mesh of 8 CPU devices, TPU interpret mode warns unless NPROC leaves XLA's CPU pool a thread
    beyond one per device (tests/repro_cpu_callback_deadlock.py shows the hang it prevents). Only traced here."""
    import warnings

    from gla_jax.ops import gla

    monkeypatch.setenv("NPROC", nproc)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.ShapeDtypeStruct((8, 128, 1, 16), jnp.float32)
    with jax.set_mesh(mesh), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.eval_shape(lambda q, k, v, g: gla(q, k, v, g, impl="mosaic_tpu", interpret=True, batch_axes="data"),
                       x, x, x, x)
    hits = [w for w in caught if "can deadlock" in str(w.message)]
    assert bool(hits) == warns, [str(w.message) for w in caught]
    if warns:
        assert "8 CPU devices" in str(hits[0].message) and "NPROC=16" in str(hits[0].message)
