"""The operator backend registry (gla_jax.ops.registry): names and aliases, the impl="auto" rule, one-line errors for
a backend that cannot run here, a test-registered backend picked by auto, and the parallel form's memory guard."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gla_jax.ops import gla, registry
from gla_jax.ops.backends import PARALLEL_MEMORY_LIMIT_BYTES, parallel_memory_bytes
from reference import reference_gla, rel_err


def _inputs(B=2, T=24, H=2, K=8, V=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)))
    return q, k, v, g


@pytest.fixture
def fake_backend():
    """Registers backends made by ``make(name, **fields)`` whose kernel counts its calls and runs the recurrent form;
    unregisters them afterwards (the registry is left as it was)."""
    made = []

    def make(name, **fields):
        calls = []

        def load():
            from gla_jax.ops.recurrent import gla_recurrent

            def fn(q, k, v, g, *, scale, initial_state, output_final_state, segment_ids, chunk_size, interpret):
                calls.append(q.shape)
                o, s = gla_recurrent(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
                return o, (s if output_final_state else None)

            return fn

        registry.register(registry.Backend(name, load, **fields))
        made.append(name)
        return calls

    yield make
    for name in made:
        registry.unregister(name)
    assert not set(made) & set(registry.choices())


def test_builtin_names_and_aliases():
    assert {"chunk", "recurrent", "parallel", "triton"} <= set(registry.names())
    assert registry.get("xla").name == "chunk" and registry.get("pallas").name == "triton"
    assert registry.choices()[0] == "auto" and {"xla", "pallas"} <= set(registry.choices())
    assert registry.get("triton").platforms == ("gpu",) and not registry.get("triton").validated


def test_auto_on_cpu_runs_chunk():
    assert registry.resolve("auto", platform="cpu").name == "chunk"
    q, k, v, g = _inputs()
    o_auto, s_auto = gla(q, k, v, g, impl="auto", output_final_state=True)
    o_ref, s_ref = reference_gla(q, k, v, g)
    assert rel_err(o_auto, o_ref) < 1e-5 and rel_err(s_auto, s_ref) < 1e-5
    o_chunk, _ = gla(q, k, v, g, impl="chunk")
    np.testing.assert_array_equal(np.asarray(o_auto), np.asarray(o_chunk))  # the very same computation


def test_auto_skips_unvalidated_gpu_kernel_and_warns_once():
    registry._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert registry.resolve("auto", platform="gpu").name == "chunk"
        assert registry.resolve("auto", platform="gpu").name == "chunk"
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "impl='triton'" in msgs[0] and "\n" not in msgs[0]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the Triton backend is native on a GPU")
def test_triton_on_cpu_without_interpret_is_a_one_line_error():
    q, k, v, g = _inputs()
    for impl in ("triton", "pallas"):
        with pytest.raises(ValueError, match=r"^impl: .*interpret=True") as info:
            gla(q, k, v, g, impl=impl)
        assert "\n" not in str(info.value)


def test_unknown_impl_lists_the_registered_names():
    q, k, v, g = _inputs()
    with pytest.raises(ValueError, match=r"^impl: expected one of auto, ") as info:
        gla(q, k, v, g, impl="flash")
    assert all(n in str(info.value) for n in registry.choices()) and "\n" not in str(info.value)


def test_registered_backend_is_picked_by_auto_when_native_and_validated(fake_backend):
    q, k, v, g = _inputs()
    o_ref, s_ref = reference_gla(q, k, v, g)
    calls = fake_backend("fake_cpu", platforms=("cpu",), validated=True, priority=100, aliases=("fake_alias",))
    assert "fake_cpu" in registry.choices() and "fake_alias" in registry.choices()
    assert registry.resolve("auto", platform="cpu").name == "fake_cpu"
    assert registry.resolve("auto", platform="tpu").name == "chunk"  # not native there
    o, s = gla(q, k, v, g, impl="auto", output_final_state=True)
    assert len(calls) == 1 and rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    gla(q, k, v, g, impl="fake_alias")
    assert len(calls) == 2
    with pytest.raises(ValueError, match="^backend.name: 'fake_cpu' is already registered"):
        registry.register(registry.Backend("fake_cpu", lambda: None))


def test_auto_passes_over_unvalidated_or_unsupporting_backends(fake_backend):
    fake_backend("fake_unvalidated", platforms=("cpu",), validated=False, priority=100)
    fake_backend("fake_unsupporting", platforms=("cpu",), validated=True, priority=90,
                 supports=lambda p: "too long" if p.seq_len > 16 else None)
    registry._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short = registry.Problem(1, 16, 1, 8, 8, "float32", 64, False, False, "cpu", False)
        long = short._replace(seq_len=32)
        assert registry.resolve("auto", platform="cpu", problem=short).name == "fake_unsupporting"
        assert registry.resolve("auto", platform="cpu", problem=long).name == "chunk"
    assert any("fake_unvalidated" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="^impl: 'fake_unsupporting' cannot run this call: too long$"):
        registry.resolve("fake_unsupporting", platform="cpu", problem=long)


def test_bad_registrations_and_unregister():
    with pytest.raises(ValueError, match="^backend.name"):
        registry.register(registry.Backend("auto", lambda: None))
    with pytest.raises(ValueError, match="^backend.name: 'xla' is already registered"):
        registry.register(registry.Backend("new_one", lambda: None, aliases=("xla",)))
    assert "new_one" not in registry.choices()
    with pytest.raises(ValueError, match="^backend.platforms"):
        registry.register(registry.Backend("new_one", lambda: None, platforms="gpu"))
    with pytest.raises(ValueError, match="^name: no backend 'nothing'"):
        registry.unregister("nothing")


def test_parallel_memory_guard():
    # B·T²·H·K float32, three times: 1 x 4096² x 8 x 64 x 12 bytes = 96 GiB
    assert parallel_memory_bytes(1, 4096, 8, 64) == 12 * 4096 ** 2 * 8 * 64
    big = jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"^impl: 'parallel' cannot run .*GiB.*impl='chunk'") as info:
        jax.eval_shape(lambda q: gla(q, q, q, q, impl="parallel"), big)
    assert "\n" not in str(info.value)
    # Just under the limit it runs (abstractly); the chunk form takes any length.
    T = int((PARALLEL_MEMORY_LIMIT_BYTES / (12 * 8 * 64)) ** 0.5)
    ok = jax.ShapeDtypeStruct((1, T, 8, 64), jnp.float32)
    assert jax.eval_shape(lambda q: gla(q, q, q, q, impl="parallel"), ok)[0].shape == (1, T, 8, 64)
    assert jax.eval_shape(lambda q: gla(q, q, q, q, impl="chunk"), big)[0].shape == (1, 4096, 8, 64)


@pytest.mark.parametrize("impl", ["mosaic_tpu", "mosaic_gpu"])
def test_mosaic_backends_through_gla_in_interpret_mode(impl):
    """The registered Mosaic backends, reached through ``gla(impl=..., interpret=True)`` with documents and an initial
    state, match the float64 recurrence on the bf16-rounded inputs (output and final state)."""
    q, k, v, g = _inputs(B=1, T=40, H=2, K=16, V=16, seed=3)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    s0 = jax.random.normal(jax.random.key(9), (1, 2, 16, 16))
    seg = jnp.asarray([[0] * 13 + [1] * 27], jnp.int32)
    o, s = gla(q, k, v, g, impl=impl, interpret=True, initial_state=s0, segment_ids=seg, output_final_state=True)
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    o_ref, s_ref = reference_gla(*map(f64, (q, k, v, g)), initial_state=f64(s0), segment_ids=np.asarray(seg))
    assert o.dtype == jnp.bfloat16 and rel_err(o, o_ref) < 4e-3 and rel_err(s, s_ref) < 4e-3


def test_mosaic_backends_refuse_what_they_cannot_run():
    q, k, v, g = _inputs()
    with pytest.raises(ValueError, match=r"^impl: 'mosaic_gpu' cannot run this call: .*bfloat16/float16"):
        gla(q, k, v, g, impl="mosaic_gpu", interpret=True)  # float32 inputs: wgmma takes 16-bit operands
    with pytest.raises(ValueError, match=r"^impl: 'mosaic_gpu' cannot run this call: .*chunks of 64"):
        gla(*(x.astype(jnp.bfloat16) for x in (q, k, v)), g, impl="mosaic_gpu", interpret=True, chunk_size=128)
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match=r"^impl: 'mosaic_tpu' runs on tpu, not "):
            gla(q, k, v, g, impl="mosaic_tpu")


def test_tpu_generation_from_device_kind():
    from gla_jax.ops.backends import tpu_generation

    kinds = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p", "TPU v5": "v5p",
             "TPU v6 lite": "v6e", "TPU v6e": "v6e", "TPU v7x": "v5e"}
    assert {k: tpu_generation(k) for k in kinds} == kinds
