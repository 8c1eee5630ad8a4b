"""Models: parameter counts of the presets (abstract, no allocation), configs vs fla's, whole-model logits vs a
float64 numpy forward, packed documents, mixed precision, remat, initialisation, logical axis names."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_models as ref
from numpy_models import build
from gla_jax.layers.sharding import PARAM_AXES
from gla_jax.models import (PRESETS, GLAConfig, GLAForCausalLM, TransformerConfig, TransformerForCausalLM,
                            build_model, get_config)
from reference import rel_err


_FWD = nnx.jit(lambda m, ids, seg: m(ids, segment_ids=seg))


def fwd(model, ids, seg=None):
    """Jitted forward (one compile per model structure instead of many eager op compiles)."""
    return _FWD(model, jnp.asarray(ids, jnp.int32), None if seg is None else jnp.asarray(seg, jnp.int32))


def n_params(config) -> int:
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def expected_gla_params(D, L, H, V, tied, ffn, rank=16):
    """Counted by hand from docs/design.md §3: q,k [D, D/2]; v, g, o [D, D]; gate D·r + r·D/2 + D/2; g_norm D/H;
    SwiGLU 3·D·ffn; two block norms; final norm; embeddings (+ lm_head when untied)."""
    attn = 2 * D * (D // 2) + 3 * D * D + D * rank + rank * (D // 2) + D // 2 + D // H
    block = attn + 3 * D * ffn + 2 * D
    return L * block + D + V * D * (1 if tied else 2)


def expected_transformer_params(D, L, V, tied, ffn):
    return L * (4 * D * D + 3 * D * ffn + 2 * D) + D + V * D * (1 if tied else 2)


def test_preset_parameter_counts():
    counts = {name: n_params(get_config(name)) for name in ("gla-340m", "gla-1.3b", "transformer-340m",
                                                              "transformer-1.3b")}
    assert counts["gla-340m"] == expected_gla_params(1024, 24, 4, 32000, True, 2816)
    assert counts["gla-1.3b"] == expected_gla_params(2048, 24, 4, 32000, False, 5632)
    assert counts["transformer-340m"] == expected_transformer_params(1024, 24, 32000, True, 2816)
    assert counts["transformer-1.3b"] == expected_transformer_params(2048, 24, 32000, False, 5632)
    for name in ("gla-340m", "transformer-340m"):
        assert 320e6 < counts[name] < 360e6, (name, counts[name])
    for name in ("gla-1.3b", "transformer-1.3b"):
        assert 1.25e9 < counts[name] < 1.45e9, (name, counts[name])


def test_gate_variants_parameter_sets():
    base = get_config("gla-tiny")
    n_gla = n_params(base)
    D, L, H = base.hidden_size, base.num_hidden_layers, base.num_heads
    gate_params = D * 16 + 16 * (D // 2) + D // 2
    assert n_params(base.replace(gate="fixed")) == n_gla - L * gate_params
    assert n_params(base.replace(gate="none")) == n_gla - L * gate_params
    assert n_params(base.replace(gate="scalar")) == n_gla - L * (16 * (D // 2) + D // 2 - (16 * H + H))


def test_config_mirrors_fla_defaults():
    ours = {f.name: f.default for f in dataclasses.fields(GLAConfig)}
    # the values docs/design.md §3 states for fla's GLAConfig
    assert (ours["hidden_size"], ours["num_hidden_layers"], ours["num_heads"], ours["expand_k"], ours["expand_v"],
            ours["hidden_ratio"], ours["norm_eps"], ours["vocab_size"], ours["tie_word_embeddings"]) == (
        2048, 24, 4, 0.5, 1.0, 4, 1e-6, 32000, False)
    for cls, rel in ((GLAConfig, "models/gla/configuration_gla.py"),
                     (TransformerConfig, "models/transformer/configuration_transformer.py")):
        fla_defaults = _fla_init_defaults(rel)
        ours = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, default in fla_defaults.items():
            if name.startswith("fuse_") or name == "use_l2warp":
                continue
            assert name in ours, f"fla's {cls.__name__} field {name} missing"
            assert ours[name] == default, (name, ours[name], default)


def _fla_init_defaults(rel):
    """Keyword defaults of fla's config ``__init__``, read from its installed source without importing torch."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla is not installed")
    src = (Path(list(spec.submodule_search_locations)[0]) / rel).read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            args = node.args.args[1:]
            defaults = node.args.defaults
            pairs = zip(args[len(args) - len(defaults):], defaults)
            return {a.arg: ast.literal_eval(d) for a, d in pairs}
    raise AssertionError(f"no __init__ in {rel}")


FLA_CONFIG_JSON = {  # what fla's GLAConfig(hidden_size=64, num_hidden_layers=1).save_pretrained writes
    "architectures": ["GLAForCausalLM"], "attn": None, "attn_mode": "chunk", "attnres_block_size": None,
    "bos_token_id": 1, "clamp_min": None, "conv_size": 4, "elementwise_affine": True, "eos_token_id": 2,
    "expand_k": 0.5, "expand_v": 1.0, "feature_map": None, "fuse_cross_entropy": True,
    "fuse_linear_cross_entropy": False, "fuse_norm": True, "fuse_swiglu": True, "hidden_act": "swish",
    "hidden_ratio": 4, "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": None,
    "max_position_embeddings": 2048, "model_type": "gla", "norm_eps": 1e-06, "num_heads": 4,
    "num_hidden_layers": 1, "num_kv_heads": None, "pad_token_id": None, "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "5.24.0", "use_cache": True, "use_gk": True,
    "use_gv": False, "use_l2warp": False, "use_output_gate": True, "use_short_conv": False, "vocab_size": 32000,
}


def test_config_from_dict_and_round_trip():
    c = GLAConfig.from_dict(FLA_CONFIG_JSON)
    assert c.hidden_size == 64 and c.num_hidden_layers == 1 and c.impl == "auto" and c.gate == "gla"
    assert GLAConfig.from_dict(c.to_dict()) == c
    hf = c.to_hf_dict()
    assert set(hf) <= set(FLA_CONFIG_JSON) and GLAConfig.from_dict(hf) == c
    assert GLAConfig.from_dict(FLA_CONFIG_JSON, impl="recurrent").impl == "recurrent"
    with pytest.raises(ValueError, match="bogus_key"):
        GLAConfig.from_dict({**FLA_CONFIG_JSON, "bogus_key": 1})
    with pytest.raises(ValueError, match="model_type"):
        GLAConfig.from_dict({**FLA_CONFIG_JSON, "model_type": "mamba"})
    with pytest.raises(ValueError, match="attn"):
        GLAConfig.from_dict({**FLA_CONFIG_JSON, "attn": {"layers": [0], "num_heads": 4}})
    t = get_config("transformer-tiny", num_kv_heads=1)
    assert TransformerConfig.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("bad", [dict(gate="exp"), dict(impl="cuda"), dict(dtype="int8"), dict(num_kv_heads=3),
                                 dict(expand_k=0.3), dict(hidden_act="gelu"), dict(attn_mode="fast"),
                                 dict(attnres_block_size=2)])
def test_config_rejects_bad_values(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key if key != "expand_k" else "expand_k"):
        GLAConfig(hidden_size=64, num_heads=4, **bad)


def test_get_config_and_presets():
    assert get_config("gla-340m").mlp_intermediate_size == 2816
    assert get_config("gla-1.3b").mlp_intermediate_size == 5632
    assert isinstance(get_config("transformer-340m"), TransformerConfig)
    assert get_config("gla-tiny", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="name"):
        get_config("gla-7b")
    with pytest.raises(ValueError, match="hidden"):
        get_config("gla-tiny", hidden=3)
    with pytest.raises(ValueError, match="window_size"):
        TransformerConfig(hidden_size=64, num_heads=4, window_size=16)


GLA_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_heads=4, vocab_size=50, impl="recurrent")


@pytest.mark.parametrize("config", [
    GLAConfig(**GLA_SMALL, use_short_conv=True, num_kv_heads=2),
    GLAConfig(**GLA_SMALL, tie_word_embeddings=True, expand_k=1.0),
    TransformerConfig(hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2, vocab_size=50),
    TransformerConfig(hidden_size=32, num_hidden_layers=2, num_heads=4, vocab_size=50, scan_layers=False),
], ids=["gla-conv-gqa", "gla-tied", "transformer", "transformer-loop"])
def test_model_matches_numpy_forward(config):
    model = build(lambda: build_model(config, rngs=nnx.Rngs(0)), scale=0.15)
    assert (model.lm_head is None) == config.tie_word_embeddings
    ids = np.random.RandomState(0).randint(0, 50, (2, 9))
    seg = np.array([[1] * 4 + [2] * 5, [7] * 9])
    logits = fwd(model, ids, seg)
    assert logits.shape == (2, 9, 50) and logits.dtype == jnp.float32
    assert rel_err(logits, ref.causal_lm(model, ids, seg)) < 2e-5
    # a packed row equals its documents run alone
    alone = fwd(model, ids[:1, 4:])
    assert rel_err(logits[:1, 4:], alone) < 2e-5


def test_gla_chunk_matches_recurrent_in_model():
    config = GLAConfig(**{**GLA_SMALL, "impl": "auto"}, use_short_conv=True)
    model = build(lambda: GLAForCausalLM(config, rngs=nnx.Rngs(0)), scale=0.15)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 50, (2, 80)), jnp.int32)
    seg = jnp.asarray(np.array([[1] * 33 + [2] * 47, [1] * 80]), jnp.int32)
    a = fwd(model, ids, seg)  # auto -> chunk on CPU
    b = nnx.jit(lambda m, i, s: m(i, segment_ids=s, impl="recurrent"))(model, ids, seg)
    assert rel_err(a, b) < 1e-5


def test_bfloat16_compute_float32_params_and_logits():
    c32 = GLAConfig(**GLA_SMALL, use_short_conv=True)
    m32 = build(lambda: GLAForCausalLM(c32, rngs=nnx.Rngs(0)), scale=0.15)
    m16 = build(lambda: GLAForCausalLM(c32.replace(dtype="bfloat16"), rngs=nnx.Rngs(0)), scale=0.15)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 9)), jnp.int32)
    l16 = fwd(m16, ids)
    assert l16.dtype == jnp.float32
    assert rel_err(l16, fwd(m32, ids)) < 5e-2


@pytest.mark.parametrize("kind", ["gla", "transformer"])
def test_scan_loop_and_remat_policies_give_same_loss_and_grads(kind):
    """The stacked layers run by jax.lax.scan or a Python loop, with or without remat (any policy), compute the same
    function and gradients (the forward itself is checked against numpy in test_model_matches_numpy_forward)."""
    base = (GLAConfig(**{**GLA_SMALL, "impl": "parallel"}) if kind == "gla"
            else TransformerConfig(hidden_size=32, num_hidden_layers=2, num_heads=4, vocab_size=50))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 50, (1, 8)), jnp.int32)

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[..., 3])

    variants = [dict(scan_layers=False), dict(scan_layers=True), dict(scan_layers=True, remat=True),
                dict(scan_layers=False, remat=True, remat_policy="dots_saveable"),
                dict(scan_layers=True, remat=True, remat_policy="everything_saveable")]
    out = []
    for v in variants:
        m = build(lambda: build_model(base.replace(**v), rngs=nnx.Rngs(0)), scale=0.15)
        out.append(nnx.jit(nnx.value_and_grad(loss))(m))
    l0, g0 = out[0]
    assert np.asarray(g0.model.layers.attn.o_proj.kernel[...]).shape[0] == 2  # stacked gradients [L, ...]
    for (l1, g1), v in zip(out[1:], variants[1:]):
        np.testing.assert_allclose(l0, l1, rtol=1e-6, err_msg=str(v))
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=str(v))  # float32 reassociation
    with pytest.raises(ValueError, match="remat_policy"):
        base.replace(remat_policy="save_everything_please")


def test_cache_protocol_continuation_equals_one_call():
    """Both families: init_cache(batch, max_len) -> {"layers" [L, ...], "index"}; feeding tokens in two calls through
    the cache equals one call; GLA ignores max_len (fixed-size state), attention needs it."""
    for config in (GLAConfig(**GLA_SMALL, use_short_conv=True),
                   TransformerConfig(hidden_size=32, num_hidden_layers=2, num_heads=4, vocab_size=50)):
        m = build(lambda: build_model(config, rngs=nnx.Rngs(0)), scale=0.15)
        ids = jnp.asarray(np.random.RandomState(2).randint(0, 50, (2, 9)), jnp.int32)
        full = fwd(m, ids)
        cache = m.init_cache(2, 9)
        assert int(cache["index"]) == 0
        assert all(x.shape[0] == 2 for x in jax.tree.leaves(cache["layers"]))  # [L, ...]
        a, cache = m(ids[:, :4], cache=cache)
        b, cache = m(ids[:, 4:], cache=cache)
        assert int(cache["index"]) == 9
        assert rel_err(np.concatenate([a, b], 1), full) < 1e-5
    gla = build(lambda: build_model(GLAConfig(**GLA_SMALL), rngs=nnx.Rngs(0)))
    assert jax.tree.map(jnp.shape, gla.init_cache(2)) == jax.tree.map(jnp.shape, gla.init_cache(2, 1000))
    with pytest.raises(ValueError, match="max_len"):
        m.init_cache(2)


def test_initialisation_like_fla():
    c = GLAConfig(hidden_size=128, num_hidden_layers=1, num_heads=2, vocab_size=256, use_short_conv=True)
    m = nnx.jit(lambda: GLAForCausalLM(c, rngs=nnx.Rngs(0)))()
    for path, var in nnx.iter_graph(m):
        if not isinstance(var, nnx.Param):
            continue
        x, name = np.asarray(var[...]), str(path[-1])
        stacked = "layers" in map(str, path)  # [L, ...] parameters of the stacked blocks
        if name == "bias":
            assert (x == 0).all(), path
        elif name == "weight" and x.ndim - stacked == 1:
            assert (x == 1).all(), path
        elif x.size >= 1024:
            assert abs(x.std() - 0.02) < 0.004 and abs(x.mean()) < 0.003, (path, x.std())


def test_model_logical_axis_names():
    m = nnx.eval_shape(lambda: GLAForCausalLM(get_config("gla-tiny", use_short_conv=True), rngs=nnx.Rngs(0)))
    specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert leaves and all(isinstance(s, jax.sharding.PartitionSpec) for s in leaves)
    assert all(n is None or n in PARAM_AXES for s in leaves for n in s)
    flat = nnx.to_flat_state(nnx.state(m, nnx.Param))
    for path, var in flat:  # the stacked blocks' parameters: a leading [L] axis named "layers"; no other has it
        names = var.get_metadata()["out_sharding"]
        in_layers = path[:2] == ("model", "layers")
        assert (names[0] == "layers") == in_layers and ("layers" in names[1:]) is False, (path, names)
        assert not in_layers or var.shape[0] == 2, (path, var.shape)
    assert nnx.get_partition_spec(nnx.state(m))["model"]["layers"]["attn"]["q_proj"]["kernel"].get_value() == \
        jax.sharding.PartitionSpec("layers", "embed", "heads")
    assert nnx.get_partition_spec(nnx.state(m))["model"]["embeddings"]["embedding"].get_value() == \
        jax.sharding.PartitionSpec("vocab", "embed")


def test_model_bad_inputs():
    m = build(lambda: GLAForCausalLM(GLAConfig(**GLA_SMALL), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="input_ids"):
        m(jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids"):
        m(jnp.zeros((2, 4), jnp.int32), segment_ids=jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="config"):
        GLAForCausalLM(get_config("transformer-tiny"), rngs=nnx.Rngs(0))
