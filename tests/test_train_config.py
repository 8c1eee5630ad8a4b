"""Training config (YAML + overrides, errors naming the key), presets, the LR schedule, weight-decay mask, FLOPs."""

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from gla_jax.train import config as C

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"


def test_defaults_are_the_cpu_default_yaml():
    a = C.load_config()
    b = C.load_config(CONFIGS / "cpu-default.yaml")
    assert C.to_dict(a) == C.to_dict(b)
    assert a.data.source == "stdlib" and a.model.arch == "gla"


def test_overrides_are_typed():
    cfg = C.load_config(None, ["optim.lr=1e-3", "data.seq_len=256", "checkpoint.async_save=false",
                               "model.hidden_size=64", "mesh.data=2", "train.sample_prompt=import os"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.seq_len == 256 and isinstance(cfg.data.seq_len, int)
    assert cfg.checkpoint.async_save is False
    assert cfg.model.overrides["hidden_size"] == 64
    assert cfg.mesh.data == 2
    assert cfg.train.sample_prompt == "import os"


@pytest.mark.parametrize("item, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("nosuch.x=1", "nosuch.x"),
    ("data.seq_len=abc", "data.seq_len"),
    ("data.seq_len=1", "data.seq_len"),
    ("optim.lr=-1", "optim.lr"),
    ("checkpoint.async_save=maybe", "checkpoint.async_save"),
    ("optim.grad_accum=3", "optim.grad_accum"),  # must divide batch 16
    ("mesh.tensor=0", "mesh.tensor"),
    ("train.compute_dtype=int8", "train.compute_dtype"),
    ("lr", "lr"),
])
def test_bad_keys_and_values_name_the_key(item, key):
    with pytest.raises(ValueError) as e:
        C.load_config(None, [item])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(key), msg


def test_yaml_unknown_section_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ValueError, match=r"^optim\.learning_rate"):
        C.load_config(p)
    p.write_text("trainer:\n  steps: 1\n")
    with pytest.raises(ValueError, match=r"^trainer"):
        C.load_config(p)
    with pytest.raises(ValueError, match=r"^--config"):
        C.load_config(tmp_path / "missing.yaml")


def test_round_trip_and_saved_config(tmp_path):
    cfg = C.load_config(CONFIGS / "gla-340m.yaml", ["train.steps=7"])
    again = C.from_dict(C.to_dict(cfg))
    assert C.to_dict(again) == C.to_dict(cfg)
    C.save_config(cfg, tmp_path / "config.yaml")
    assert C.to_dict(C.load_config(tmp_path / "config.yaml")) == C.to_dict(cfg)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_presets_resolve(name):
    from gla_jax.train.model import model_config

    cfg = C.load_config(CONFIGS / f"{name}.yaml")
    mcfg = model_config(cfg)
    assert mcfg.model_type == cfg.model.arch
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    if name.endswith("340m") or name.endswith("1.3b"):
        # the paper's recipe (docs/design.md §8)
        big = name.endswith("1.3b")
        assert mcfg.hidden_size == (2048 if big else 1024) and mcfg.num_hidden_layers == 24
        assert mcfg.tie_word_embeddings == (not big) and mcfg.vocab_size == 32000
        assert tokens_per_step == (2 if big else 0.5) * 2 ** 20
        total = cfg.train.steps * tokens_per_step
        assert abs(total - (100e9 if big else 15e9)) < tokens_per_step
        assert abs(cfg.optim.warmup_steps * tokens_per_step - (1e9 if big else 0.5e9)) < tokens_per_step
        assert cfg.optim.lr == 3e-4 and math.isclose(cfg.optim.lr * cfg.optim.min_lr_ratio, 3e-5)
        assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.clip_norm) == (0.9, 0.95, 0.01, 1.0)
        assert cfg.train.compute_dtype == "bfloat16" and cfg.data.seq_len == 2048
        if cfg.model.arch == "gla":
            assert mcfg.mlp_intermediate_size == (5632 if big else 2816)


def test_compute_dtype_and_remat_reach_the_model():
    from gla_jax.train.model import model_config

    m = model_config(C.load_config(None, ["train.compute_dtype=bfloat16", "train.remat=true"]))
    assert m.dtype == "bfloat16" and m.remat is True and m.param_dtype == "float32"
    m = model_config(C.load_config(None, ["train.compute_dtype=bfloat16", "model.dtype=float32"]))
    assert m.dtype == "float32"  # an explicit model field wins


def test_model_key_errors():
    from gla_jax.train.model import model_config

    with pytest.raises(ValueError, match=r"^model\.hidden_sise"):
        model_config(C.load_config(None, ["model.hidden_sise=3"]))
    with pytest.raises(ValueError, match=r"^model\.num_heads"):
        model_config(C.load_config(None, ["model.num_heads=two"]))
    with pytest.raises(ValueError, match=r"^model\.preset"):
        model_config(C.load_config(None, ["model.preset=gla-9b"]))
    with pytest.raises(ValueError, match=r"^model\.vocab_size"):
        model_config(C.load_config(None, ["model.vocab_size=100"]), tokenizer_vocab=257)


def test_cli_errors_and_print_config(capsys):
    from gla_jax.cli.train import main

    assert main(["--workdir", "/nonexistent-dir-x", "optim.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optim.nope" in err
    assert main(["--print-config", "--workdir", "/nonexistent-dir-x", "train.steps=5"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out


# ------------------------------------------------------------------------------------------------------------
# optimizer pieces

def test_schedule_warmup_then_cosine_to_ten_percent():
    from gla_jax.train.optim import learning_rate_schedule

    cfg = C.load_config(None, ["optim.lr=1e-3", "optim.warmup_steps=10"]).optim
    s = learning_rate_schedule(cfg, 110)
    assert float(s(0)) == 0.0
    assert math.isclose(float(s(5)), 0.5e-3, rel_tol=1e-6)
    assert math.isclose(float(s(10)), 1e-3, rel_tol=1e-6)
    # cosine half way: min + (peak - min) * (1 + cos(pi/2)) / 2
    assert math.isclose(float(s(60)), 1e-4 + 0.9e-3 * 0.5, rel_tol=1e-5)
    assert math.isclose(float(s(110)), 1e-4, rel_tol=1e-5)
    assert math.isclose(float(s(500)), 1e-4, rel_tol=1e-5)


def test_weight_decay_mask_and_adamw_update():
    from gla_jax.train.optim import decay_mask, make_optimizer

    params = {"layers": {"0": {"attn": {"q_proj": {"kernel": np.ones((4, 4), np.float32)},
                                        "gk_proj_1": {"kernel": np.ones((2, 4), np.float32),
                                                      "bias": np.ones((4,), np.float32)},
                                        "g_norm": {"weight": np.ones((4,), np.float32)}},
                               "attn_norm": {"weight": np.ones((4,), np.float32)}}},
              "embeddings": {"embedding": np.ones((8, 4), np.float32)}}
    m = decay_mask(params)
    a = m["layers"]["0"]["attn"]
    assert a["q_proj"]["kernel"] and a["gk_proj_1"]["kernel"] and m["embeddings"]["embedding"]
    assert not a["gk_proj_1"]["bias"] and not a["g_norm"]["weight"] and not m["layers"]["0"]["attn_norm"]["weight"]
    # one AdamW step with zero gradients: only decayed parameters move, by lr * wd * p
    cfg = C.load_config(None, ["optim.lr=0.1", "optim.warmup_steps=0", "optim.weight_decay=0.5"]).optim
    tx = make_optimizer(cfg, 100)
    grads = jax.tree.map(np.zeros_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    assert np.allclose(upd["embeddings"]["embedding"], -0.1 * 0.5)
    assert np.allclose(upd["layers"]["0"]["attn"]["gk_proj_1"]["bias"], 0.0)


# ------------------------------------------------------------------------------------------------------------
# FLOP count against the model's actual parameter shapes

@pytest.mark.parametrize("arch", ["gla", "transformer"])
def test_flops_match_parameter_count(arch):
    from flax import nnx

    from gla_jax.train import flops
    from gla_jax.train.model import build_model, model_config

    over = ["model.hidden_size=64", "model.num_heads=2", "model.num_hidden_layers=2", "model.vocab_size=256",
            "model.tie_word_embeddings=false", f"model.arch={arch}"]
    if arch == "gla":
        over.append("model.use_short_conv=false")
    mcfg = model_config(C.load_config(None, over))
    abs_model = nnx.eval_shape(lambda: build_model(mcfg, 0))
    state = nnx.state(abs_model, nnx.Param)
    matmul = 0
    for path, var in nnx.to_flat_state(state):
        names = "/".join(str(p) for p in path)
        stacked = "layers" in map(str, path)  # the blocks' [L, in, out] kernels: L matrices
        if len(var.shape) - stacked == 2 and "embedding" not in names:
            matmul += math.prod(var.shape)
    T = 128
    fwd = flops.forward_flops_per_token(mcfg, T)
    if arch == "gla":
        H, dk, dv = mcfg.num_heads, 64 * mcfg.expand_k / 2, 64 * mcfg.expand_v / 2
        extra = mcfg.num_hidden_layers * H * (4 * dk * dv + (64 + 16) * (dk + dv))
    else:
        extra = mcfg.num_hidden_layers * 2 * T * mcfg.hidden_size
    assert math.isclose(fwd, 2 * matmul + extra, rel_tol=1e-9), (fwd, 2 * matmul + extra)
    assert flops.train_flops_per_token(mcfg, T) == 3 * fwd
    assert flops.peak_flops_per_device(override=5.0) == 5.0


def test_flops_refuse_an_unregistered_model():
    """An unknown config is an error, never silently counted as some other family."""
    import dataclasses

    from gla_jax.models import GLAConfig
    from gla_jax.train import flops

    @dataclasses.dataclass(frozen=True)
    class Stranger(GLAConfig):
        model_type = "stranger"

    with pytest.raises(ValueError, match="registered model family"):
        flops.forward_flops_per_token(Stranger(hidden_size=64, num_heads=2), 128)
