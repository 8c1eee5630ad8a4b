"""The baseline families (Mamba2, Mamba, RetNet) as whole causal LMs against PyTorch: a randomly initialised
transformers (Mamba2ForCausalLM, MambaForCausalLM) or fla (RetNetForCausalLM) model written with
``save_pretrained`` is read by ``gla_jax.convert.load_hf`` and gives the same float32
logits; ``save_hf`` writes a directory PyTorch reads back to the same logits and config; decoding through the cache
protocol equals the full forward and greedy ``generate`` equals teacher forcing; the trainer builds each family from
``model.arch`` and one step lowers the loss; FLOP counts against the model's own matrices; presets' sizes.

The PyTorch side runs in a subprocess (tests/family_harness.py; fla's Triton kernels in the interpreter); torch,
transformers and fla are never imported here.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from family_harness import run_family_harness, torch_side_available
from gla_jax.convert import load_hf, save_hf
from reference import rel_err
from train_checks import one_step_losses

TOL = 1e-4  # float32 against PyTorch float32
needs_torch = pytest.mark.skipif(not torch_side_available(), reason="torch/fla/triton/transformers not installed")

# name -> (kind, PyTorch config kwargs, seq len, our config overrides at load). Small chunk sizes so that the test
# sequences cross chunk boundaries of the JAX scans.
CASES = {
    "mamba2_groups": ("mamba2", dict(hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=2,
                                     num_hidden_layers=2, vocab_size=50, chunk_size=16, tie_word_embeddings=False),
                      40, {}),
    "mamba2_bias_tied": ("mamba2", dict(hidden_size=48, num_heads=6, head_dim=16, state_size=16, n_groups=1,
                                        num_hidden_layers=3, vocab_size=61, conv_kernel=3, use_bias=True,
                                        use_conv_bias=False, time_step_limit=(0.0, 0.8), layer_norm_epsilon=1e-6,
                                        chunk_size=8, tie_word_embeddings=True), 29, {}),
    "mamba_tied": ("mamba", dict(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=50), 40,
                   dict(chunk_size=16)),
    "mamba_bias_rank": ("mamba", dict(hidden_size=48, state_size=16, conv_kernel=3, time_step_rank=5, use_bias=True,
                                      use_conv_bias=False, num_hidden_layers=2, vocab_size=57, layer_norm_epsilon=1e-6,
                                      tie_word_embeddings=False), 33, dict(chunk_size=16)),
    "retnet_fused_gate": ("retnet", dict(hidden_size=64, num_heads=2, num_hidden_layers=2, vocab_size=50,
                                         tie_word_embeddings=False), 40, dict(chunk_size=16)),
    "retnet_gqa_nogate": ("retnet", dict(hidden_size=64, num_heads=4, num_kv_heads=2, expand_k=0.5, expand_v=1.0,
                                         hidden_ratio=4, use_output_gate=False, feature_map="swish", fuse_norm=False,
                                         num_hidden_layers=2, vocab_size=47, tie_word_embeddings=True), 37,
                          dict(chunk_size=16)),
}
DEFAULT = ("mamba2_groups", "mamba_tied", "retnet_fused_gate")
PER_CASE = [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in CASES]
# config.json keys that are bookkeeping or kernel choices (fla's fuse_* switches: save_hf writes fla's defaults),
# not the model
_BOOKKEEPING = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures", "fuse_norm",
                "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp"}


def _ids(name):
    kind, kw, T, _ = CASES[name]
    r = np.random.default_rng(sum(map(ord, name)))
    return r.integers(0, kw["vocab_size"], (2, T)).tolist()


def _selected_cases(request) -> list[str]:
    """The cases some selected test of this module uses (the PyTorch side is slow: it runs only those)."""
    names = {item.callspec.params.get("name") for item in request.session.items
             if item.module is request.module and hasattr(item, "callspec")}
    return [n for n in CASES if n in names]


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory, request):
    """Each selected case created in PyTorch (``save_pretrained``), loaded here with ``load_hf``, written back with
    ``save_hf`` and reloaded in PyTorch: {case: dict(dir, logits, config, saved, reloaded_logits, reloaded_config)}."""
    work = tmp_path_factory.mktemp("families")
    selected = _selected_cases(request)
    jobs = [dict(op="create", kind=CASES[name][0], config=CASES[name][1], dir=str(work / name), ids=_ids(name),
                 seed=list(CASES).index(name), out=str(work / f"{name}.npz")) for name in selected]
    run_family_harness(jobs, work / "create")
    out = {}
    for name in selected:
        overrides = CASES[name][3]
        data = np.load(work / f"{name}.npz")
        out[name] = dict(dir=work / name, logits=data["logits"], config=json.loads(str(data["config"])))
        _, model = load_hf(work / name, **overrides)
        save_hf(model, work / f"{name}_saved")
        out[name]["saved"] = work / f"{name}_saved"
    jobs = [dict(op="reload", kind=CASES[name][0], dir=str(r["saved"]), ids=_ids(name),
                 out=str(work / f"{name}_reloaded.npz")) for name, r in out.items()]
    run_family_harness(jobs, work / "reload")
    for name, r in out.items():
        data = np.load(work / f"{name}_reloaded.npz")
        r["reloaded_logits"], r["reloaded_config"] = data["logits"], json.loads(str(data["config"]))
    return out


def _forward(model, ids, **kw):
    return nnx.jit(lambda m, i: m(i, **kw))(model, jnp.asarray(ids, jnp.int32))


@needs_torch
@pytest.mark.parametrize("name", PER_CASE)
def test_load_hf_logits_match_pytorch(torch_runs, name):
    run = torch_runs[name]
    config, model = load_hf(run["dir"], **CASES[name][3])
    assert config.model_type == CASES[name][0] and type(model).__name__.lower().startswith(config.model_type)
    logits = _forward(model, _ids(name))
    err = rel_err(logits, run["logits"])
    print(f"{name}: logits rel err {err:.2e} (|logits| rms {np.sqrt(np.mean(run['logits'] ** 2)):.2f})")
    assert logits.shape == run["logits"].shape and err < TOL


@needs_torch
@pytest.mark.parametrize("name", PER_CASE)
def test_save_hf_round_trip_reloads_in_pytorch(torch_runs, name):
    run = torch_runs[name]
    assert rel_err(run["reloaded_logits"], run["logits"]) < 1e-6
    original = {k: v for k, v in run["config"].items() if k not in _BOOKKEEPING}
    reloaded = {k: v for k, v in run["reloaded_config"].items() if k not in _BOOKKEEPING}
    assert reloaded == original


@needs_torch
@pytest.mark.parametrize("name", DEFAULT)
def test_negative_control_perturbed_weight_is_detected(torch_runs, name):
    _, model = load_hf(torch_runs[name]["dir"], **CASES[name][3])
    attn = model.model.layers.attn  # the last layer's decays (RetNet: output norm, its decays are fixed), 5% off
    w = attn.g_norm.weight if CASES[name][0] == "retnet" else attn.A_log
    w.set_value(w[...].at[1].multiply(1.05))
    assert rel_err(_forward(model, _ids(name)), torch_runs[name]["logits"]) > 10 * TOL


def _random_model(preset, seed=0, **overrides):
    from gla_jax.models import build_model, get_config

    return build_model(get_config(preset, **overrides), rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("preset", ["mamba2-tiny", pytest.param("mamba-tiny", marks=pytest.mark.slow),
                                    pytest.param("retnet-tiny", marks=pytest.mark.slow)])
def test_cache_decoding_and_generate_equal_teacher_forcing(preset):
    from gla_jax.generate import generate

    model = _random_model(preset, vocab_size=64, chunk_size=16, num_hidden_layers=2)
    ids = np.random.default_rng(0).integers(0, 64, (2, 21))
    forward = nnx.jit(lambda m, i: m(i))
    full = np.asarray(forward(model, jnp.asarray(ids, jnp.int32)))
    # the cache protocol: a prefix with the chunk form, then one token at a time (the recurrent step)
    step = nnx.jit(lambda m, i, c: m(i, cache=c))
    logits, cache = step(model, jnp.asarray(ids[:, :13], jnp.int32), model.init_cache(2))
    parts = [np.asarray(logits)]
    for t in range(13, 21):
        logits, cache = step(model, jnp.asarray(ids[:, t:t + 1], jnp.int32), cache)
        parts.append(np.asarray(logits))
    assert int(cache["index"]) == 21 and rel_err(np.concatenate(parts, axis=1), full) < 1e-5
    # greedy generation from prompts of different lengths = argmax of the full forward, token by token
    prompts, n = [[5, 7, 1], [2, 9, 4, 4, 8, 3, 3, 1, 0, 7]], 6
    out = generate(model, prompts, max_new_tokens=n).sequences()
    buf = np.zeros(ids.shape, np.int32)  # both rows at once, the shape compiled above (causal: later slots unused)
    for b, prompt in enumerate(prompts):
        buf[b, :len(prompt)] = prompt
    for k in range(n):
        logits = np.asarray(forward(model, jnp.asarray(buf)))
        for b, prompt in enumerate(prompts):
            buf[b, len(prompt) + k] = int(np.argmax(logits[b, len(prompt) + k - 1]))
    assert out == [list(buf[b, len(p):len(p) + n]) for b, p in enumerate(prompts)]


@pytest.mark.parametrize("arch,preset", [("mamba2", "mamba2-tiny"),
                                         pytest.param("mamba", "mamba-tiny", marks=pytest.mark.slow),
                                         pytest.param("retnet", "retnet-tiny", marks=pytest.mark.slow)])
def test_trainer_builds_the_family_and_one_step_lowers_the_loss(arch, preset):
    from gla_jax.train import config as C
    from gla_jax.train import flops
    from gla_jax.train import model as loop

    cfg = C.load_config(None, [f"model.arch={arch}", f"model.preset={preset}", "model.num_hidden_layers=2",
                               "optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=3"])
    mcfg = loop.model_config(cfg)
    assert mcfg.model_type == arch and mcfg.num_hidden_layers == 2
    model = nnx.jit(lambda: loop.build_model(mcfg, 0))()
    assert (model.model.layers.mlp is None) == (arch != "retnet")  # Mamba blocks have no MLP
    before, after = one_step_losses(model, cfg.optim)
    assert abs(float(before) - math.log(mcfg.vocab_size)) < 0.2 and float(after) < float(before) - 0.05
    # FLOPs: at least 2 per multiply-add of every matrix (projections and the tied head); the rest is the scan
    abstract = nnx.eval_shape(lambda: loop.build_model(mcfg, 0))
    matmul = sum(math.prod(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
                 if len(v.shape) - ("layers" in map(str, p)) == 2 and "conv1d" not in map(str, p)
                 and "A_log" not in map(str, p) and "g_norm" not in map(str, p))
    scan = flops.forward_flops_per_token(mcfg, 32) - 2 * matmul
    assert 0 < scan < 0.5 * 2 * matmul


def test_presets_parameter_counts():
    """The parameter counts stated in the family files' preset comments."""
    from gla_jax.models import build_model, get_config

    stated = {"mamba2-340m": 349_619_712, "mamba2-1.3b": 1_371_839_488, "mamba-340m": 352_797_696,
              "mamba-1.3b": 1_400_276_992, "retnet-340m": 347_403_264, "retnet-1.3b": 1_351_727_104}
    for preset, count in stated.items():
        abstract = nnx.eval_shape(lambda: build_model(get_config(preset), rngs=nnx.Rngs(0)))
        assert sum(v.size for v in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == count, preset


def test_bad_configs_name_the_field(tmp_path):
    from gla_jax.models.mamba2 import Mamba2Config

    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        Mamba2Config(hidden_size=32, num_heads=3, head_dim=16, n_groups=1)
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, n_groups=3)
    with pytest.raises(ValueError, match="time_step_limit"):
        Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, n_groups=1, time_step_limit=(1.0, 0.5))
    with pytest.raises(ValueError, match="hidden_act"):
        Mamba2Config.from_hf({"model_type": "mamba2", "hidden_act": "gelu"})
    # config.json round trip of our config, transformers' encoding of an infinite limit included
    c = Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, n_groups=2, num_hidden_layers=1, vocab_size=11)
    raw = json.loads(json.dumps(c.to_hf_dict()))
    assert Mamba2Config.from_hf(raw) == c
    raw["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
    assert Mamba2Config.from_hf(raw) == c

    from gla_jax.models.mamba import MambaConfig

    with pytest.raises(ValueError, match="time_step_rank"):
        MambaConfig(time_step_rank=0)
    with pytest.raises(ValueError, match="intermediate_size"):
        MambaConfig.from_hf({"model_type": "mamba", "hidden_size": 32, "expand": 2, "intermediate_size": 96})
    with pytest.raises(ValueError, match="architectures"):
        MambaConfig.from_hf({"model_type": "mamba", "architectures": ["Mamba2ForCausalLM"]})
    m = MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=11, time_step_rank=3)
    assert MambaConfig.from_hf(json.loads(json.dumps(m.to_hf_dict()))) == m

    from gla_jax.models.retnet import RetNetConfig

    with pytest.raises(ValueError, match="expand_k"):
        RetNetConfig(hidden_size=64, num_heads=3)
    with pytest.raises(ValueError, match="attn"):
        RetNetConfig.from_hf({"model_type": "retnet", "attn": {"layers": [0]}})
    r = RetNetConfig(hidden_size=64, num_heads=2, num_hidden_layers=1, vocab_size=11)
    assert RetNetConfig.from_hf(json.loads(json.dumps(r.to_hf_dict()))) == r


def test_another_family_without_a_preset_names_one():
    """The embedded default's model.* sizes are GLA's: another family without a preset is one line naming a preset
    that works (and that preset builds)."""
    from gla_jax.train import config as C
    from gla_jax.train import model as M

    for arch in ("mamba", "mamba2"):
        with pytest.raises(ValueError, match=rf"^model.*model.preset={arch}-tiny\)$") as info:
            M.model_config(C.load_config(None, [f"model.arch={arch}"]))
        assert "\n" not in str(info.value)
        assert M.model_config(C.load_config(None, [f"model.arch={arch}", f"model.preset={arch}-tiny"])).model_type == arch
