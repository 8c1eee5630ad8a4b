"""Parity with the PyTorch library fla: operator outputs, model logits of fla checkpoints loaded with load_fla, and
fla loading what save_fla writes.

The torch side runs in a subprocess (tests/fla_harness.py) with Triton's interpreter; these tests are skipped only
when torch/fla/triton/transformers are not installed. The reference folder is built once per test session and shared
between pytest-xdist workers (file lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fla_harness import OP_CASES, PARITY_CONFIGS, fla_available, run_harness

pytestmark = pytest.mark.skipif(not fla_available(), reason="torch/fla/triton/transformers not installed")


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| over all elements, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _shared_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def fla_refs(tmp_path_factory) -> Path:
    """Folder made by ``fla_harness.py make`` (fla checkpoints, tokens, logits, op references), built once."""
    root = _shared_root(tmp_path_factory)
    out = root / "fla_refs"
    with open(root / "fla_refs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "done.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                run_harness("make", str(out))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def _available_impls():
    impls = ["recurrent"]
    try:
        import gla_jax.ops.chunk  # noqa: F401
        impls.append("chunk")
    except ImportError:
        pass
    return impls


# ------------------------------------------------------------------------------------------------ operator level


@pytest.mark.parametrize("case", list(OP_CASES))
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_gla_matches_fla_naive_recurrent(fla_refs, case, impl):
    if impl not in _available_impls():
        pytest.skip(f"impl={impl!r} not implemented yet")
    from gla_jax.ops import gla

    ref = np.load(fla_refs / f"op_{case}.npz")
    q, k, v, g = (jnp.asarray(ref[n]) for n in "qkvg")
    # one compilation serves both runs: a zero initial state is the default one
    run = jax.jit(lambda h0: gla(q, k, v, g, initial_state=h0, output_final_state=True, impl=impl))
    o, s = run(jnp.zeros_like(jnp.asarray(ref["h0"])))
    assert o.dtype == jnp.float32 and o.shape == ref["o"].shape
    assert rel_err(o, ref["o"]) <= 1e-5
    assert rel_err(s, ref["s"]) <= 1e-5
    o, s = run(jnp.asarray(ref["h0"]))
    assert rel_err(o, ref["o_h0"]) <= 1e-5
    assert rel_err(s, ref["s_h0"]) <= 1e-5


# ------------------------------------------------------------------------------------------------------ model level


def _forward(model, tokens, impl=None):
    from flax import nnx

    @nnx.jit(static_argnames="impl")
    def fwd(m, x, impl):
        return m(x, impl=impl)

    return np.asarray(fwd(model, jnp.asarray(tokens), impl))


# The model-level tests run the recurrent operator form (quick to compile); the chunkwise form, the CPU default, is
# checked against fla at operator level above and end to end on one config below.


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_fla_checkpoint_logits_match(fla_refs, name):
    """fla GLAForCausalLM (random weights, save_pretrained) -> load_fla -> same logits."""
    from gla_jax.convert import load_fla

    d = fla_refs / name
    config, model = load_fla(d)
    for key, value in PARITY_CONFIGS[name].items():
        if key not in ("fuse_norm", "fuse_swiglu", "fuse_cross_entropy"):
            assert getattr(config, key) == value, key
    assert (model.lm_head is None) == bool(PARITY_CONFIGS[name].get("tie_word_embeddings", False))
    logits = _forward(model, np.load(d / "tokens.npy"), impl="recurrent")
    ref = np.load(d / "logits.npy")
    assert logits.shape == ref.shape and logits.dtype == np.float32
    assert rel_err(logits, ref) <= 1e-4


def test_fla_checkpoint_logits_match_default_impl(fla_refs):
    """The operator form users get by default (chunkwise on CPU, Pallas on GPU)."""
    from gla_jax.convert import load_fla

    d = fla_refs / "gqa_conv"
    _, model = load_fla(d)
    assert rel_err(_forward(model, np.load(d / "tokens.npy")), np.load(d / "logits.npy")) <= 1e-4


def _randomize(model, seed: int) -> None:
    """O(1)-output random weights for every parameter (the default init's std 0.02 makes near-zero logits)."""
    from flax import nnx

    rng = np.random.default_rng(seed)
    flat = sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0]))
    for path, var in flat:
        current = var.get_value()  # abstract (ShapeDtypeStruct) or concrete
        shape, name = current.shape, str(path[-1])
        stacked = "layers" in map(str, path)  # the blocks' parameters carry a leading [L] axis
        if name == "weight" and len(shape) - stacked == 1:  # norms
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name in ("bias", "embedding"):
            value = rng.standard_normal(shape)
        elif name == "weight":  # short conv [C, W]
            value = rng.standard_normal(shape) / np.sqrt(shape[-1])
        else:  # kernel [(L,) in, out]
            value = rng.standard_normal(shape) / np.sqrt(shape[-2])
        var.set_value(jnp.asarray(value, current.dtype))


NATIVE_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, num_kv_heads=2, expand_k=1.0,
                     use_short_conv=True, tie_word_embeddings=True, vocab_size=96, clamp_min=-0.1)


@pytest.fixture(scope="session")
def saved_for_fla(fla_refs, tmp_path_factory):
    """save_fla outputs (a model built in gla-jax, and fla checkpoints passed through load_fla) with fla's logits."""
    from flax import nnx

    from gla_jax.convert import load_fla, save_fla
    from gla_jax.models import GLAConfig, GLAForCausalLM

    root = _shared_root(tmp_path_factory)
    out = root / "saved_for_fla"
    with open(root / "saved_for_fla.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "done.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                config = GLAConfig(**NATIVE_CONFIG)
                model = nnx.eval_shape(lambda r: GLAForCausalLM(config, rngs=r), nnx.Rngs(3))  # no init
                _randomize(model, seed=4)
                save_fla(model, config, out / "native")
                tokens = np.random.default_rng(5).integers(0, config.vocab_size, size=(1, 72)).astype(np.int32)
                np.save(out / "native" / "tokens.npy", tokens)
                for name in ("base", "conv_tied"):
                    save_fla(*reversed(load_fla(fla_refs / name)), out / name)
                    shutil.copy(fla_refs / name / "tokens.npy", out / name / "tokens.npy")
                lines = run_harness("logits", *(str(out / n) for n in ("native", "base", "conv_tied")))
                info = {Path(r["dir"]).name: r for r in map(json.loads, lines.strip().splitlines())}
                (out / "done.json").write_text(json.dumps(info))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out, json.loads((out / "done.json").read_text())


@pytest.mark.parametrize("name", ["native", "base", "conv_tied"])
def test_save_fla_loads_in_fla(saved_for_fla, fla_refs, name):
    """fla's AutoModelForCausalLM and GLAForCausalLM.from_pretrained load save_fla's output with our logits."""
    from gla_jax.convert import load_fla

    out, info = saved_for_fla
    d = out / name
    assert info[name]["auto_class"] == "GLAForCausalLM" and info[name]["auto_equals_direct"]
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "gla" and config["architectures"] == ["GLAForCausalLM"]
    assert info[name]["tied"] == config["tie_word_embeddings"]
    if config["tie_word_embeddings"]:
        assert info[name]["lm_head_is_embeddings"]
    fla_logits = np.load(d / "fla_logits.npy")
    _, model = load_fla(d)
    assert rel_err(_forward(model, np.load(d / "tokens.npy"), impl="recurrent"), fla_logits) <= 1e-4
    if name == "base":  # same weights, same fla config: fla computes exactly what it computed before the round trip
        np.testing.assert_array_equal(fla_logits, np.load(fla_refs / name / "logits.npy"))
    elif name != "native":  # fla's fused/unfused norm kernels differ in rounding only
        assert rel_err(fla_logits, np.load(fla_refs / name / "logits.npy")) <= 1e-5


@pytest.mark.parametrize("options", [dict(tie_word_embeddings=True),
                                     dict(tie_word_embeddings=False, qk_norm=True, qkv_bias=True, num_kv_heads=2)])
def test_transformer_tensor_map_matches_fla_names_and_shapes(options):
    """Transformer++'s HF map (save_hf/load_hf) names exactly the tensors of fla's TransformerForCausalLM, with their
    shapes (fla's attention needs flash-attn to run, so only the layout is compared here; the values' round trip is
    in test_convert.py)."""
    from gla_jax.models import TransformerConfig, get_family

    fields = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=100, intermediate_size=96, **options)
    fla_names = json.loads(run_harness("transformer-names", json.dumps(fields)).strip().splitlines()[-1])
    fla_names = {k: tuple(v) for k, v in fla_names.items()}
    if fields["tie_word_embeddings"]:
        fla_names.pop("lm_head.weight", None)  # a view of the embeddings in fla's state dict
    layout = get_family("transformer").hf_layout(TransformerConfig(**fields))
    assert {k: e.shape for k, e in layout.items()} == fla_names
