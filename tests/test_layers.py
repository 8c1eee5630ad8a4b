"""Layers against independent float64 numpy forms of their math (tests/numpy_models.py) and against properties
(documents in a packed row are independent; a cached continuation equals one long call)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_models as ref
from numpy_models import build
from gla_jax.layers.attention import Attention
from gla_jax.layers.conv import ShortConvolution
from gla_jax.layers.gla import GatedLinearAttention, fixed_decay_log
from gla_jax.layers.mlp import GatedMLP, default_intermediate_size
from gla_jax.layers.norm import RMSNorm
from gla_jax.layers.rotary import apply_rotary
from gla_jax.layers.sharding import PARAM_AXES, constrain

from reference import rel_err

TOL = 1e-5  # float32 vs float64


def _rand(shape, seed=0, scale=1.0):
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32) * scale


def test_rmsnorm_matches_formula():
    n = build(lambda: RMSNorm(16, eps=1e-6))
    x = _rand((3, 5, 16))
    assert rel_err(n(jnp.asarray(x)), ref.rmsnorm(x.astype(np.float64), ref.P(n.weight), 1e-6)) < TOL
    n2 = RMSNorm(16, elementwise_affine=False)
    assert n2.weight is None
    with pytest.raises(ValueError, match="x"):
        n(jnp.zeros((2, 8)))


def test_rmsnorm_bf16_output_dtype_stats_fp32():
    n = RMSNorm(16, dtype=jnp.bfloat16)
    x = jnp.asarray(_rand((2, 16)) * 1e3, jnp.bfloat16)
    y = n(x)
    assert y.dtype == jnp.bfloat16 and n.weight[...].dtype == jnp.float32
    assert rel_err(y, ref.rmsnorm(np.asarray(x, np.float64), None, 1e-6)) < 1e-2


def test_mlp_matches_formula_and_default_width():
    assert default_intermediate_size(1024) == 2816 and default_intermediate_size(2048) == 5632
    assert default_intermediate_size(64, 4) == 256
    m = build(lambda: GatedMLP(32, rngs=nnx.Rngs(0)))
    assert m.gate_proj.kernel.shape == (32, 256) and m.down_proj.kernel.shape == (256, 32)
    x = _rand((2, 3, 32))
    assert rel_err(m(jnp.asarray(x)), ref.mlp(m, x.astype(np.float64))) < TOL
    with pytest.raises(ValueError, match="hidden_act"):
        GatedMLP(32, hidden_act="gelu", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bias", [False, True])
def test_short_conv_matches_loop_segments_and_cache(bias):
    conv = build(lambda: ShortConvolution(6, 4, bias=bias, rngs=nnx.Rngs(0)))
    assert conv.weight.shape == (6, 4)
    x = _rand((2, 11, 6))
    seg = np.array([[0] * 4 + [1] * 2 + [2] * 5, [3] * 11])
    y, _ = conv(jnp.asarray(x))
    assert rel_err(y, ref.short_conv(conv, x.astype(np.float64))) < TOL
    y, _ = conv(jnp.asarray(x), segment_ids=jnp.asarray(seg))
    assert rel_err(y, ref.short_conv(conv, x.astype(np.float64), seg)) < TOL
    # continuing from a cache equals one long call
    y_full, c_full = conv(jnp.asarray(x), output_final_state=True)
    y1, c1 = conv(jnp.asarray(x[:, :5]), output_final_state=True)
    y2, c2 = conv(jnp.asarray(x[:, 5:]), cache=c1, output_final_state=True)
    assert rel_err(jnp.concatenate([y1, y2], 1), y_full) < TOL
    np.testing.assert_allclose(c2, c_full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cache"):
        conv(jnp.asarray(x), cache=jnp.zeros((2, 2, 6)))


def test_numpy_recurrence_matches_float64_reference():
    from reference import reference_gla

    B, T, H, K, V = 2, 7, 2, 4, 3
    q, k, v = _rand((B, T, H, K), 1), _rand((B, T, H, K), 2), _rand((B, T, H, V), 3)
    g = -np.abs(_rand((B, T, H, K), 4))
    seg = np.array([[0, 0, 0, 1, 1, 2, 2], [4] * 7])
    o, _ = reference_gla(q, k, v, g, segment_ids=seg)
    np.testing.assert_allclose(ref.gla_recurrence(*(a.astype(np.float64) for a in (q, k, v, g)), seg), o,
                               rtol=1e-10, atol=1e-12)


def test_rotary_formula_and_relative_property():
    x = _rand((1, 6, 2, 8))
    pos = np.arange(6)[None]
    y = apply_rotary(jnp.asarray(x), jnp.asarray(pos), 10000.0)
    assert rel_err(y, ref.rope(x.astype(np.float64), pos.astype(np.float64), 10000.0)) < TOL
    # <rot(q, m), rot(k, n)> depends on m - n only
    q, k = _rand((1, 1, 1, 8), 1), _rand((1, 1, 1, 8), 2)
    dots = []
    for m, n in [(3, 1), (10, 8), (102, 100)]:
        rq = apply_rotary(jnp.asarray(q), jnp.array([[m]]), 10000.0)
        rk = apply_rotary(jnp.asarray(k), jnp.array([[n]]), 10000.0)
        dots.append(float(jnp.sum(rq * rk)))
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


GLA_CASES = [
    dict(),
    dict(use_short_conv=True, num_kv_heads=2, conv_bias=True, clamp_min=-0.05),
    dict(expand_k=1.0, num_kv_heads=1, feature_map="relu", elementwise_affine=False),
    dict(gate="scalar", num_kv_heads=2),
    dict(gate="fixed"),
    dict(gate="none", use_output_gate=False),
]


def _gla(**kw):
    base = dict(hidden_size=32, num_heads=4, impl="recurrent", norm_eps=1e-6)
    return build(lambda: GatedLinearAttention(**{**base, **kw}, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("kw", GLA_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default"
                                               for c in GLA_CASES])
def test_gla_layer_matches_numpy(kw):
    layer = _gla(**kw)
    x = _rand((2, 9, 32))
    seg = np.array([[1] * 4 + [2] * 5, [1] * 9])
    assert rel_err(layer(jnp.asarray(x)), ref.gla_layer(layer, x.astype(np.float64))) < TOL
    got = layer(jnp.asarray(x), segment_ids=jnp.asarray(seg))
    assert rel_err(got, ref.gla_layer(layer, x.astype(np.float64), seg)) < TOL


def test_gla_layer_shapes_and_names():
    a = _gla(num_kv_heads=2, use_short_conv=True)
    assert a.q_proj.kernel.shape == (32, 16) and a.k_proj.kernel.shape == (32, 8)
    assert a.v_proj.kernel.shape == (32, 16) and a.g_proj.kernel.shape == (32, 32)
    assert a.gk_proj_0.kernel.shape == (32, 16) and a.gk_proj_0.bias is None
    assert a.gk_proj_1.kernel.shape == (16, 8) and a.gk_proj_1.bias.shape == (8,)
    assert a.o_proj.kernel.shape == (32, 32) and a.g_norm.weight.shape == (8,)
    assert a.q_conv1d.weight.shape == (16, 4) and a.k_conv1d.weight.shape == (8, 4)
    assert a.v_conv1d.weight.shape == (16, 4)
    s = _gla(gate="scalar")
    assert s.gk_proj_1.kernel.shape == (16, 4)
    f = _gla(gate="fixed")
    assert f.gk_proj_0 is None and f.gk_proj_1 is None
    np.testing.assert_allclose(fixed_decay_log(3), np.log(1 - 2.0 ** -np.array([5.0, 6.0, 7.0])), rtol=1e-6)


def test_gla_layer_cache_continuation():
    layer = _gla(**GLA_CASES[1])
    x = jnp.asarray(_rand((2, 9, 32)))
    full = layer(x)
    y1, c = layer(x[:, :5], return_cache=True)
    assert c["recurrent"].shape == (2, 4, 4, 8) and c["conv"][0].shape == (2, 3, 16)
    y2 = layer(x[:, 5:], cache=c)
    assert rel_err(jnp.concatenate([y1, y2], 1), full) < TOL


def test_gla_layer_bad_inputs():
    with pytest.raises(ValueError, match="num_kv_heads"):
        GatedLinearAttention(32, num_heads=4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gate"):
        GatedLinearAttention(32, gate="bogus", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl"):
        GatedLinearAttention(32, impl="fast", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expand_k"):
        GatedLinearAttention(30, expand_k=0.33, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feature_map"):
        GatedLinearAttention(32, feature_map="tanh", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must be"):
        _gla()(jnp.zeros((2, 3, 16)))


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2, qkv_bias=True, qk_norm=True)])
def test_attention_matches_numpy(kw):
    a = build(lambda: Attention(32, 4, rngs=nnx.Rngs(0), **kw))
    x = _rand((2, 7, 32))
    seg = np.array([[1] * 3 + [2] * 4, [5] * 7])
    assert rel_err(a(jnp.asarray(x)), ref.attention_layer(a, x.astype(np.float64))) < TOL
    got = a(jnp.asarray(x), segment_ids=jnp.asarray(seg))
    assert rel_err(got, ref.attention_layer(a, x.astype(np.float64), seg)) < TOL


def test_every_param_has_logical_names():
    for layer in (nnx.eval_shape(lambda: GatedLinearAttention(32, use_short_conv=True, num_kv_heads=2,
                                                              rngs=nnx.Rngs(0))),
                  nnx.eval_shape(lambda: Attention(32, 4, qkv_bias=True, qk_norm=True, rngs=nnx.Rngs(0))),
                  nnx.eval_shape(lambda: GatedMLP(32, rngs=nnx.Rngs(0)))):
        for path, var in nnx.iter_graph(layer):
            if isinstance(var, nnx.Param):
                names = var.get_metadata().get("out_sharding")
                assert names is not None and len(names) == var.ndim, path
                assert all(n is None or n in PARAM_AXES for n in names), (path, names)


def test_constrain_noop_without_mesh_and_applies_with_mesh():
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("batch", "seq", "embed")) is x
    devs = np.array(jax.devices()[:2])
    if devs.size < 2:
        pytest.skip("needs 2 devices")
    mesh = jax.sharding.Mesh(devs, ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh), nnx.logical_axis_rules((("batch", "data"), ("embed", None))):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", "seq", "embed")))(x)
    assert y.sharding.spec[0] == "data"
    np.testing.assert_array_equal(y, x * 2)
