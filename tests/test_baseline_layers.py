"""Baseline layers (RetNet, Mamba, Mamba2) against their PyTorch counterparts, run in a subprocess
(tests/baseline_harness.py): fla's MultiScaleRetention (Triton interpreter), transformers' MambaMixer and Mamba2Mixer
(pure-PyTorch CPU paths), each with random weights; plus step-by-step decoding = the full forward, packed documents =
separate calls, and the weight mapping's round trip and errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from baseline_harness import CASES, run_baseline_harness, torch_side_available
from gla_jax.layers.hf_weights import layer_state_dict, load_layer_weights
from gla_jax.layers.mamba import MambaMixer
from gla_jax.layers.mamba2 import Mamba2Mixer
from gla_jax.layers.retention import MultiScaleRetention
from reference import rel_err

TOL = 1e-4  # float32 against PyTorch float32
needs_torch = pytest.mark.skipif(not torch_side_available(), reason="torch/fla/triton/transformers not installed")


# one case per layer kind runs by default; the others are marked slow
_DEFAULT = ("retnet_conv_gqa", "mamba_bias_rank", "mamba2_groups")
ONE_PER_KIND = [n if n in _DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in CASES]


def build_layer(kind, kwargs, seed=0):
    """Our layer for a harness case (chunk size 16, so that the test sequences span several chunks)."""
    kw = {k: v for k, v in kwargs.items() if k not in ("fuse_norm", "chunk_size")}
    cls = {"retnet": MultiScaleRetention, "mamba": MambaMixer, "mamba2": Mamba2Mixer}[kind]
    return cls(**kw, chunk_size=16, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="session")
def torch_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines")
    run_baseline_harness(out)
    return out


def _case(torch_outputs, name):
    kind, kwargs, _ = CASES[name]
    data = dict(np.load(torch_outputs / f"{name}.npz"))
    layer = build_layer(kind, kwargs)
    load_layer_weights(layer, {k[2:]: v for k, v in data.items() if k.startswith("w.")})
    return layer, data


def _call(layer, x, *, segment_ids=None, cache=None, return_cache=False):
    """``layer(x, ...)`` under one ``jax.jit`` (eager dispatch of the scans is slow on CPU)."""
    graphdef, state = nnx.split(layer)
    kw = {} if segment_ids is None else {"segment_ids": segment_ids}
    f = jax.jit(lambda state, x, kw, cache: nnx.merge(graphdef, state)(x, cache=cache, return_cache=return_cache,
                                                                        **kw))
    return f(state, x, kw, cache)


def _decode(layer, x):
    """Runs ``layer.step`` token by token (jitted) from a zero cache; returns [B, T, D]."""
    graphdef, state = nnx.split(layer)
    step = jax.jit(lambda state, x_t, cache: nnx.merge(graphdef, state).step(x_t, cache))
    cache = layer.init_cache(x.shape[0])
    ys = []
    for t in range(x.shape[1]):
        y_t, cache = step(state, x[:, t], cache)
        ys.append(y_t)
    return jnp.stack(ys, axis=1), cache


@needs_torch
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_pytorch(torch_outputs, name):
    layer, data = _case(torch_outputs, name)
    y = _call(layer, jnp.asarray(data["x"]))
    err = rel_err(y, data["y"])
    print(f"{name}: rel err {err:.2e}, max abs {np.max(np.abs(np.asarray(y) - data['y'])):.2e}")
    assert err < TOL


@needs_torch
@pytest.mark.parametrize("name", ONE_PER_KIND)
def test_decoding_matches_full_forward(torch_outputs, name):
    layer, data = _case(torch_outputs, name)
    x = jnp.asarray(data["x"])
    y_full, cache_full = _call(layer, x, return_cache=True)
    y_steps, cache_steps = _decode(layer, x)
    assert rel_err(y_steps, y_full) < 1e-5 and rel_err(y_steps, data["y"]) < TOL
    for a, b in zip(jax.tree.leaves(cache_steps), jax.tree.leaves(cache_full)):
        assert rel_err(a, b) < 1e-5
    # prefill a prefix with the chunk form, then continue with the chunk form on the rest
    k = x.shape[1] // 2 + 3
    y1, cache = _call(layer, x[:, :k], return_cache=True)
    y2 = _call(layer, x[:, k:], cache=cache)
    assert rel_err(jnp.concatenate([y1, y2], axis=1), y_full) < 1e-5


@needs_torch
def test_negative_control_perturbed_weight_is_detected(torch_outputs):
    for name, param in (("mamba_base", "A_log"), ("mamba2_groups", "dt_bias"), ("retnet_base", "g_norm")):
        layer, data = _case(torch_outputs, name)
        var = getattr(layer, param) if param != "g_norm" else layer.g_norm.weight
        var.set_value(var[...] * 1.05) if hasattr(var, "set_value") else setattr(var, "value", var.value * 1.05)
        assert rel_err(_call(layer, jnp.asarray(data["x"])), data["y"]) > 10 * TOL, name


@pytest.mark.parametrize("name", ONE_PER_KIND)
def test_weight_round_trip_and_errors(name):
    kind, kwargs, _ = CASES[name]
    src = build_layer(kind, kwargs, seed=1)
    sd = layer_state_dict(src, prefix="layers.3.mixer.")
    dst = build_layer(kind, kwargs, seed=2)
    load_layer_weights(dst, sd, prefix="layers.3.mixer.")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 9, kwargs["hidden_size"])), jnp.float32)
    assert np.array_equal(np.asarray(_call(src, x)), np.asarray(_call(dst, x)))
    first = sorted(sd)[0]
    with pytest.raises(ValueError, match="missing"):
        load_layer_weights(dst, {k: v for k, v in sd.items() if k != first}, prefix="layers.3.mixer.")
    with pytest.raises(ValueError, match="unexpected"):
        load_layer_weights(dst, {**sd, "layers.3.mixer.extra.weight": np.zeros(2)}, prefix="layers.3.mixer.")
    bad = dict(sd)
    bad[first] = np.zeros(np.asarray(sd[first]).shape + (2,))
    with pytest.raises(ValueError, match=re.escape(f"{first} has shape")):
        load_layer_weights(dst, bad, prefix="layers.3.mixer.")


@pytest.mark.parametrize("kind,kwargs", [
    ("retnet", dict(hidden_size=32, num_heads=2, use_short_conv=True)),
    ("mamba2", dict(hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=2)),
    ("mamba", dict(hidden_size=32, state_size=8, conv_kernel=4)),
])
def test_packed_documents_equal_separate_calls(kind, kwargs):
    layer = build_layer(kind, kwargs)
    r = np.random.default_rng(3)
    a, b = (jnp.asarray(r.standard_normal((1, n, 32)), jnp.float32) for n in (21, 19))
    seg = jnp.asarray(np.repeat([0, 1], [21, 19])[None], jnp.int32)
    packed = _call(layer, jnp.concatenate([a, b], axis=1), segment_ids=seg)
    assert rel_err(packed[:, :21], _call(layer, a)) < 1e-5 and rel_err(packed[:, 21:], _call(layer, b)) < 1e-5


def test_bad_configs_name_the_argument():
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        Mamba2Mixer(32, num_heads=3, head_dim=16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2Mixer(32, num_heads=4, head_dim=16, n_groups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiScaleRetention(64, num_heads=4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden_act"):
        MambaMixer(32, hidden_act="gelu", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="u: expected shape"):
        MambaMixer(32, rngs=nnx.Rngs(0))(jnp.zeros((1, 4, 16)))
