"""gla_jax.convert and ``gla-jax convert`` without torch: file layout, exact round trips, older layouts, sharded
checkpoints, bfloat16, and the errors for what is not supported. (Parity with fla itself: test_fla_parity.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from gla_jax.convert import fla_layout, load_fla, read_safetensors, save_fla, write_safetensors
from gla_jax.models import GLAConfig, GLAForCausalLM

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2, expand_k=1.0, vocab_size=50,
             use_short_conv=True, intermediate_size=48)


def _params(model) -> dict:
    """{'model.layers.0.attn.q_proj.kernel': np.ndarray, ...}"""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in flat}


def _random_model(seed=0, **overrides):
    config = GLAConfig(**{**SMALL, **overrides})
    # abstract construction (no initializer runs), then random values: O(1) weights, quick to make
    model = nnx.eval_shape(lambda r: GLAForCausalLM(config, rngs=r), nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(rng.standard_normal(var.get_value().shape), var.get_value().dtype))
    return config, model


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    config, model = _random_model()
    d = save_fla(model, config, tmp_path_factory.mktemp("fla") / "ckpt")
    return config, model, d


def _copy_with(src: Path, dst: Path, tensors=None, config=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    if config:
        cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    write_safetensors(read_safetensors(src) if tensors is None else tensors, dst / "model.safetensors")
    return dst


# ------------------------------------------------------------------------------------------------------- layout


def test_save_fla_writes_fla_names_shapes_and_config(saved):
    config, model, d = saved
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "gla" and cfg["architectures"] == ["GLAForCausalLM"]
    for key in ("hidden_size", "num_heads", "num_kv_heads", "expand_k", "vocab_size", "use_short_conv",
                "intermediate_size", "tie_word_embeddings", "norm_eps"):
        assert cfg[key] == getattr(config, key), key
    t = read_safetensors(d)
    D, H, Hkv, V = 32, 4, 2, 50
    assert t["model.embeddings.weight"].shape == (V, D)
    assert t["lm_head.weight"].shape == (V, D)
    assert t["model.layers.1.attn.q_proj.weight"].shape == (D, D)  # [out, in]
    assert t["model.layers.1.attn.k_proj.weight"].shape == (D * Hkv // H, D)
    assert t["model.layers.0.attn.q_conv1d.weight"].shape == (D, 1, 4)
    assert t["model.layers.0.attn.gk_proj.0.weight"].shape == (16, D)
    assert t["model.layers.0.attn.gk_proj.1.bias"].shape == (D * Hkv // H,)
    assert t["model.layers.0.attn.g_norm_swish_gate.weight"].shape == (D // H,)  # fla's name with fuse_norm
    assert t["model.layers.0.mlp.down_proj.weight"].shape == (D, 48)
    # values: Linear weights are our kernels transposed, conv weights gain the middle axis
    attn = model.model.layer(1).attn  # layer 1 of the stacked [L, ...] parameters
    np.testing.assert_array_equal(t["model.layers.1.attn.q_proj.weight"], np.asarray(attn.q_proj.kernel[...]).T)
    np.testing.assert_array_equal(t["model.layers.1.attn.v_conv1d.weight"][:, 0], np.asarray(attn.v_conv1d.weight[...]))
    np.testing.assert_array_equal(t["lm_head.weight"], np.asarray(model.lm_head.kernel[...]).T)
    assert set(t) == set(fla_layout(config))
    with open(d / "model.safetensors", "rb") as f:  # transformers requires format=pt metadata
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}


def test_round_trip_is_exact(saved, tmp_path):
    config, model, d = saved
    config2, model2 = load_fla(d)
    assert config2 == config
    _assert_same_params(model, model2)
    d2 = save_fla(model2, config2, tmp_path / "again")
    a, b = read_safetensors(d), read_safetensors(d2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((d / "config.json").read_text()) == json.loads((d2 / "config.json").read_text())


def test_tied_embeddings(tmp_path):
    config, model = _random_model(seed=1, tie_word_embeddings=True, use_short_conv=False, num_kv_heads=None)
    d = save_fla(model, config, tmp_path / "tied")
    t = read_safetensors(d)
    assert "lm_head.weight" not in t and "model.layers.0.attn.q_conv1d.weight" not in t
    config2, model2 = load_fla(d)
    assert config2.tie_word_embeddings and model2.lm_head is None
    _assert_same_params(model, model2)
    # older files also carry a copy of the embeddings as lm_head.weight: accepted when equal, refused otherwise
    t["lm_head.weight"] = t["model.embeddings.weight"].copy()
    _assert_same_params(model, load_fla(_copy_with(d, tmp_path / "copy", t))[1])
    t["lm_head.weight"] = t["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_fla(_copy_with(d, tmp_path / "differs", t))


def test_bfloat16_checkpoint(saved, tmp_path):
    config, model, _ = saved
    d = save_fla(model, config, tmp_path / "bf16", dtype="bfloat16")
    t = read_safetensors(d)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in t.values())
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    _, model2 = load_fla(d)
    p, p2 = _params(model), _params(model2)
    for k in p:  # float32 parameters holding exactly the bf16-rounded values
        assert p2[k].dtype == np.float32
        np.testing.assert_array_equal(p2[k], p[k].astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)
    t2 = read_safetensors(save_fla(model2, config, tmp_path / "bf16b", dtype="bfloat16"))
    assert all(np.array_equal(t[k].view(np.uint16), t2[k].view(np.uint16)) for k in t)


def test_fused_mlp_layout(saved, tmp_path):
    """Older fla checkpoints: one mlp.gate_proj [2I, D] (first half gate, second half up)."""
    config, model, d = saved
    t = read_safetensors(d)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        t[p + "gate_proj.weight"] = np.concatenate([t[p + "gate_proj.weight"], t.pop(p + "up_proj.weight")])
    assert t["model.layers.0.mlp.gate_proj.weight"].shape == (96, 32)
    _, model2 = load_fla(_copy_with(d, tmp_path / "fused", t))
    _assert_same_params(model, model2)


def test_unfused_norm_name(saved, tmp_path):
    """fla names the output norm attn.g_norm when fuse_norm is off, attn.g_norm_swish_gate when on; both load."""
    config, model, d = saved
    t = {k.replace("g_norm_swish_gate", "g_norm"): v for k, v in read_safetensors(d).items()}
    _, model2 = load_fla(_copy_with(d, tmp_path / "unfused", t, config={"fuse_norm": False}))
    _assert_same_params(model, model2)
    _, model3 = load_fla(_copy_with(d, tmp_path / "mixed", t))  # fuse_norm true but the unfused name
    _assert_same_params(model, model3)


def test_sharded_checkpoint(saved, tmp_path):
    config, model, d = saved
    t = read_safetensors(d)
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((d / "config.json").read_text())
    for file, keys in shards.items():
        write_safetensors({k: t[k] for k in keys}, out / file)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_same_params(model, load_fla(out)[1])

    index["weight_map"]["model.norm.extra"] = "model-00001-of-00002.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.norm.extra"):
        load_fla(out)
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002"):
        load_fla(out)


# ------------------------------------------------------------------------------------------------------- errors


def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_rejects_bad_tensors(saved, tmp_path):
    _, _, d = saved
    t = read_safetensors(d)

    def with_tensors(name, tensors):
        return lambda: load_fla(_copy_with(d, tmp_path / name, tensors))

    _one_line_error(with_tensors("unknown", {**t, "model.layers.0.attn.q_norm.weight": np.ones(8, np.float32)}),
                    "model.layers.0.attn.q_norm.weight")
    _one_line_error(with_tensors("missing", {k: v for k, v in t.items() if k != "model.norm.weight"}),
                    "model.norm.weight: missing")
    bad = dict(t)
    bad["model.layers.1.attn.k_proj.weight"] = bad["model.layers.1.attn.k_proj.weight"][:8]
    _one_line_error(with_tensors("shape", bad), r"model.layers.1.attn.k_proj.weight: shape \(8, 32\)")
    bad = dict(t)
    bad["model.norm.weight"] = np.ones(32, np.int32)
    _one_line_error(with_tensors("dtype", bad), "model.norm.weight: dtype int32")


@pytest.mark.parametrize("change, match", [
    ({"attn": {"layers": [1], "num_heads": 4}}, "attn"),
    ({"model_type": "transformer"}, "model_type"),
    ({"hidden_act": "powlu"}, "hidden_act"),
    ({"attnres_block_size": 2}, "attnres_block_size"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"expand_k": 0.3}, "expand_k"),
])
def test_rejects_unsupported_configs(saved, tmp_path, change, match):
    _, _, d = saved
    _one_line_error(lambda: load_fla(_copy_with(d, tmp_path / "c", config=change)), match)


def test_ignores_hf_bookkeeping_and_kernel_options(saved, tmp_path):
    config, model, d = saved
    extra = {"transformers_version": "9.9", "dtype": "bfloat16", "torch_dtype": "bfloat16", "attn_mode": "fused_chunk",
             "fuse_swiglu": False, "fuse_cross_entropy": False, "use_l2warp": True, "some_future_field": 1}
    config2, model2 = load_fla(_copy_with(d, tmp_path / "extra", config=extra))
    assert config2.dtype == config.dtype  # HF's storage dtype does not become our compute dtype
    _assert_same_params(model, model2)


def test_refuses_pickle_and_missing_files(saved, tmp_path):
    _, _, d = saved
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text((d / "config.json").read_text())
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    _one_line_error(lambda: load_fla(pk), "pickle")
    _one_line_error(lambda: load_fla(pk / "pytorch_model.bin"), "pickle")
    _one_line_error(lambda: load_fla(tmp_path / "nowhere"), "path")
    empty = tmp_path / "noconfig"
    empty.mkdir()
    _one_line_error(lambda: load_fla(empty), "config.json")
    (empty / "config.json").write_text((d / "config.json").read_text())
    _one_line_error(lambda: load_fla(empty), "safetensors")


def test_save_fla_refuses_what_fla_cannot_hold(tmp_path):
    config, model = _random_model(gate="scalar")
    _one_line_error(lambda: save_fla(model, config, tmp_path / "scalar"), "gate")
    config, model = _random_model()
    _one_line_error(lambda: save_fla(model, config, tmp_path / "d", dtype="int8"), "dtype")


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_round_trip(saved, tmp_path):
    from gla_jax.cli import main as gla_main
    from gla_jax.train.checkpoint import load_params

    config, model, d = saved
    ck, back = tmp_path / "ck", tmp_path / "back"
    assert gla_main(["convert", "--from-fla", str(d), "--out", str(ck)]) == 0
    assert (ck / "params").is_dir()
    assert GLAConfig.from_dict(json.loads((ck / "config.json").read_text())) == config
    abstract = nnx.eval_shape(lambda r: GLAForCausalLM(config, rngs=r), nnx.Rngs(0))
    raw = load_params(ck, target=nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))  # as the trainer's tools read it
    np.testing.assert_array_equal(np.asarray(raw["model"]["norm"]["weight"]), np.asarray(model.model.norm.weight[...]))
    assert gla_main(["convert", "--to-fla", str(ck), "--out", str(back)]) == 0
    a, b = read_safetensors(d), read_safetensors(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert gla_main(["convert", "--from-fla", str(d), "--out", str(ck)]) == 2  # refuses to overwrite
    assert gla_main(["convert", "--from-fla", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert gla_main(["convert", "--to-fla", str(tmp_path), "--out", str(tmp_path / "y")]) == 2


def test_cli_to_fla_from_training_checkpoint(saved, tmp_path):
    """A training run's Checkpointer step (params saved as an nnx.State of arrays) converts to fla."""
    from gla_jax.cli import main as gla_main
    from gla_jax.train.checkpoint import Checkpointer

    config, model, d = saved
    work = tmp_path / "work"
    ckptr = Checkpointer(work / "checkpoints", async_save=False)
    state = nnx.state(model, nnx.Param)
    values = jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    opt = {"count": jnp.zeros((), jnp.int32)}
    ckptr.save(7, values, opt, {"step": 7}, {})
    ckptr.close()
    (work / "model_config.json").write_text(json.dumps(config.to_dict()))
    out = tmp_path / "fla"
    assert gla_main(["convert", "--to-fla", str(work), "--out", str(out), "--dtype", "float32"]) == 0
    a, b = read_safetensors(d), read_safetensors(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_garbage_safetensors_is_one_line(saved, tmp_path):
    _, _, d = saved
    bad = _copy_with(d, tmp_path / "garbage")
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file at all" * 3)
    msg = _one_line_error(lambda: load_fla(bad), "model.safetensors is not a readable safetensors file")
    assert msg.startswith("path:")
    raw = (d / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated
    _one_line_error(lambda: load_fla(bad), "not a readable safetensors file")


def test_cli_to_fla_refuses_a_non_empty_output(saved, tmp_path, capsys):
    from gla_jax.cli import main as gla_main

    _, _, d = saved
    ck, out = tmp_path / "ck", tmp_path / "out"
    assert gla_main(["convert", "--from-fla", str(d), "--out", str(ck)]) == 0
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert gla_main(["convert", "--to-fla", str(ck), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out" in err and "not an empty directory" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gla_main(["convert", "--to-fla", str(ck), "--out", str(empty)]) == 0  # an empty folder is fine


# ---------------------------------------------------------------------------------------------- every family


def test_load_hf_dispatches_on_model_type_and_round_trips_transformer(saved, tmp_path):
    """load_hf/save_hf read and write any registered family (the map onto the stacked [L, ...] parameters); a GLA
    directory written by save_fla loads through load_hf too."""
    from gla_jax.convert import load_hf, save_hf
    from gla_jax.models import TransformerConfig, TransformerForCausalLM

    _, gla_model, d = saved
    config, model = load_hf(d)
    assert isinstance(model, GLAForCausalLM)
    _assert_same_params(gla_model, model)

    tconfig = TransformerConfig(hidden_size=32, num_hidden_layers=2, num_heads=4, num_kv_heads=2, vocab_size=50,
                                qk_norm=True, qkv_bias=True, intermediate_size=48)
    tmodel = nnx.eval_shape(lambda r: TransformerForCausalLM(tconfig, rngs=r), nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(tmodel, nnx.Param)):
        var.set_value(jnp.asarray(rng.standard_normal(var.get_value().shape), jnp.float32))
    out = save_hf(tmodel, tmp_path / "transformer")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "transformer" and raw["architectures"] == ["TransformerForCausalLM"]
    t = read_safetensors(out)
    q = np.asarray(tmodel.model.layers.attn.q_proj.kernel[...])  # [L, in, out]
    np.testing.assert_array_equal(t["model.layers.1.attn.q_proj.weight"], q[1].T)
    assert t["model.layers.0.attn.k_norm.weight"].shape == (8,) and t["model.layers.1.attn.v_proj.bias"].shape == (16,)
    config2, model2 = load_hf(out)
    assert config2 == tconfig and isinstance(model2, TransformerForCausalLM)
    _assert_same_params(tmodel, model2)
    with pytest.raises(ValueError, match="model_type"):
        load_fla(out)  # load_fla stays GLA-only
    bad = _copy_with(out, tmp_path / "unknown", config={"model_type": "no-such-family"})
    _one_line_error(lambda: load_hf(bad), "model_type")
