"""``gla-jax convert`` / ``eval`` / ``generate`` for every registered model family (GLA, Transformer++, RetNet, Mamba,
Mamba2), and the per-family FLOP counts against a hand count.

- ``--to-hf`` (alias ``--to-fla``) writes a gla-jax checkpoint of any family as an fla/HF directory that PyTorch
  loads (fla's ``GLAForCausalLM``/``TransformerForCausalLM``/``RetNetForCausalLM``, transformers'
  ``MambaForCausalLM``/``Mamba2ForCausalLM``: tests/family_harness.py, a subprocess) to the same float32 logits as
  ours; ``--from-hf`` (alias ``--from-fla``) reads it back to the same parameters.
- A checkpoint made by ``--from-hf`` of an HF Mamba/Mamba2/RetNet directory generates (``gla-jax generate``) the
  greedy continuation of the model's own forward, and ``gla-jax eval`` scores it as that model.
- Bad input is one line naming the field (unknown ``model_type``).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from family_harness import run_family_harness, torch_side_available
from reference import rel_err

TOL = 1e-4  # float32 against PyTorch float32
needs_torch = pytest.mark.skipif(not torch_side_available(), reason="torch/fla/triton/transformers not installed")

# family -> (preset, small overrides). Chunk sizes below the test length, so the chunked forms cross chunk boundaries.
FAMILIES = {
    "gla": ("gla-tiny", dict(hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=61,
                             tie_word_embeddings=False)),
    "transformer": ("transformer-tiny", dict(hidden_size=32, num_heads=4, num_kv_heads=2, num_hidden_layers=2,
                                             vocab_size=61)),
    "retnet": ("retnet-tiny", dict(hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=61, chunk_size=16,
                                   tie_word_embeddings=False)),
    "mamba": ("mamba-tiny", dict(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=61, chunk_size=16)),
    "mamba2": ("mamba2-tiny", dict(hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
                                   vocab_size=61, chunk_size=16)),
}
# The PyTorch side is slow (a subprocess importing torch, fla's kernels in Triton's interpreter: ~1 min for all five
# under load): one family by default, the others with -m slow.
PYTORCH_DEFAULT = ("mamba2",)
PER_FAMILY_PYTORCH = [f if f in PYTORCH_DEFAULT else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
T = 40


def _random_model(family: str, seed: int = 0, **more):
    """The family's preset at the small sizes with random weights of O(1) activations (norm weights near 1, biases
    and skip weights of order 1, decay logs spread, matrices ~ 1/sqrt(fan in)), so that a tensor mapped wrongly
    shows in the logits. Built abstractly: no initializer runs (every parameter is set here)."""
    from gla_jax.models import build_model, get_config

    preset, overrides = FAMILIES[family]
    config = get_config(preset, **{**overrides, **more})
    model = nnx.eval_shape(lambda r: build_model(config, rngs=r), nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, shape = ".".join(map(str, path)), var.get_value().shape
        r = rng.standard_normal(shape)
        if "norm" in name:
            v = 1.0 + 0.2 * r
        elif name.endswith("A_log"):
            v = 0.5 * r
        elif name.endswith("dt_bias") or name.endswith("dt_proj.bias"):
            v = 0.5 * r - 1.0
        elif name.endswith(".D") or name.endswith("bias") or name.endswith("embedding"):
            v = r
        else:  # kernels [(L,) in, out] and convolution weights [(L,) C, W]
            v = r / np.sqrt(shape[-1] if "conv" in name else shape[-2])
        var.set_value(jnp.asarray(v, jnp.float32))
    return model


def _save_checkpoint(model, path):
    """The gla-jax checkpoint the CLI reads: ``path/params`` (orbax) + ``config.json`` / ``model_config.json``."""
    from gla_jax.train.checkpoint import save_params

    config = model.config
    save_params(path, nnx.to_pure_dict(nnx.state(model, nnx.Param)), config.to_dict())
    (path / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return path


def _ids(family, vocab=61, batch=2, length=T):
    return np.random.default_rng(sum(map(ord, family))).integers(0, vocab, (batch, length)).tolist()


def _forward(model, ids):
    return np.asarray(nnx.jit(lambda m, i: m(i))(model, jnp.asarray(ids, jnp.int32)))


def _flat(model) -> dict:
    return {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _selected(request, test_name=None) -> list[str]:
    """The families some selected test of this module (or only ``test_name``) runs with."""
    names = {item.callspec.params.get("family") for item in request.session.items
             if item.module is request.module and hasattr(item, "callspec")
             and test_name in (None, item.originalname)}
    return [f for f in FAMILIES if f in names]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    """Each selected family: a random model saved as a gla-jax checkpoint and written with ``gla-jax convert
    --to-hf`` (GLA with the older ``--to-fla``): {family: dict(model, ckpt, hf, ours)}, ``ours`` our logits for
    ``_ids(family)``."""
    from gla_jax.cli import main as gla_main

    work = tmp_path_factory.mktemp("convert_families")
    runs = {}
    for i, family in enumerate(_selected(request)):
        model = _random_model(family, seed=i)
        ckpt = _save_checkpoint(model, work / f"{family}_ckpt")
        hf = work / f"{family}_hf"
        flag = "--to-fla" if family == "gla" else "--to-hf"
        assert gla_main(["convert", flag, str(ckpt), "--out", str(hf)]) == 0
        runs[family] = dict(model=model, ckpt=ckpt, hf=hf, ours=_forward(model, _ids(family)))
    return runs


@pytest.fixture(scope="module")
def torch_logits(exported, tmp_path_factory, request):
    """PyTorch's logits for ``_ids(family)`` of each exported directory its test selected, loaded with
    ``from_pretrained`` by tests/family_harness.py: {family: logits}."""
    work = tmp_path_factory.mktemp("convert_families_torch")
    selected = _selected(request, "test_to_hf_loads_in_pytorch_with_our_logits")
    jobs = [dict(op="reload", kind=f, dir=str(exported[f]["hf"]), ids=_ids(f), out=str(work / f"{f}.npz"))
            for f in selected]
    run_family_harness(jobs, work)
    return {f: np.load(work / f"{f}.npz")["logits"] for f in selected}


@needs_torch
@pytest.mark.parametrize("family", PER_FAMILY_PYTORCH)
def test_to_hf_loads_in_pytorch_with_our_logits(exported, torch_logits, family):
    run, theirs = exported[family], torch_logits[family]
    raw = json.loads((run["hf"] / "config.json").read_text())
    assert raw["model_type"] == family
    err = rel_err(theirs, run["ours"])
    print(f"{family}: PyTorch vs gla-jax logits rel err {err:.2e}")
    assert theirs.shape == (2, T, 61) and err < TOL
    # negative control: one perturbed embedding row is visible at this tolerance
    assert rel_err(theirs, _forward(_perturbed(run["model"]), _ids(family))) > 10 * TOL


def _perturbed(model):
    """A copy of ``model`` with the embedding row of one token of ``_ids`` scaled by 1.2."""
    out = nnx.clone(model)
    emb = out.model.embeddings.embedding
    token = int(np.ravel(_ids(out.config.model_type))[0])
    emb.set_value(emb.get_value().at[token].multiply(1.2))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_hf_reads_back_the_same_parameters(exported, family, tmp_path):
    """``--to-hf`` then ``--from-hf`` (GLA: the older ``--from-fla``) is the identity on the parameters and the
    HF config; the converted checkpoint loads as the CLI tools load it."""
    from gla_jax.cli import main as gla_main
    from gla_jax.train.load import load_model

    run = exported[family]
    back = tmp_path / "back"
    flag = "--from-fla" if family == "gla" else "--from-hf"
    assert gla_main(["convert", flag, str(run["hf"]), "--out", str(back)]) == 0
    config, model = load_model(back)
    # gla-jax's own fields (operator chunk length, dtypes) have no HF counterpart and come back as defaults
    assert type(config) is type(run["model"].config) and config.to_hf_dict() == run["model"].config.to_hf_dict()
    a, b = _flat(run["model"]), _flat(model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ eval / generate after --from-hf


def _converted(family, tmp_path, vocab=320):
    """An HF directory of a random one-layer ``family`` model (``save_hf``: transformers'/fla's layout) converted
    with ``gla-jax convert --from-hf``: (our model, checkpoint folder)."""
    from gla_jax.cli import main as gla_main
    from gla_jax.convert import save_hf

    model = _random_model(family, seed=3, vocab_size=vocab, num_hidden_layers=1)
    hf = save_hf(model, tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    assert gla_main(["convert", "--from-hf", str(hf), "--out", str(ckpt)]) == 0
    return model, ckpt


@pytest.mark.parametrize("family", ["mamba2", pytest.param("mamba", marks=pytest.mark.slow),
                                    pytest.param("retnet", marks=pytest.mark.slow)])
def test_generate_from_a_converted_checkpoint_is_greedy_teacher_forcing(family, tmp_path, capsys):
    from gla_jax.cli import main as gla_main

    model, ckpt = _converted(family, tmp_path, vocab=61)
    prompts, n = [[5, 7, 1], [2, 9, 4, 4, 8, 3]], 4
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(ckpt), "--max-new-tokens", str(n), "--no-stop", "--json"]
    for p in prompts:
        argv += ["--ids", ",".join(map(str, p))]
    assert gla_main(argv) == 0
    got = [json.loads(line)["ids"] for line in capsys.readouterr().out.strip().splitlines()]
    # the reference: argmax of the full forward, one token at a time (both rows in one fixed-shape buffer: causal,
    # so the slots after a row's end do not matter)
    buf = np.zeros((len(prompts), 16), np.int32)
    for b, p in enumerate(prompts):
        buf[b, :len(p)] = p
    for k in range(n):
        logits = _forward(model, buf)
        for b, p in enumerate(prompts):
            buf[b, len(p) + k] = int(np.argmax(logits[b, len(p) + k - 1]))
    assert got == [buf[b, len(p):len(p) + n].tolist() for b, p in enumerate(prompts)]


def _eval_workdir(path, family_vocab):
    """A run directory (config.yaml) whose own model is GLA: the converted checkpoint must bring its own model."""
    from gla_jax.train import config as C
    from gla_jax.train.trainer import save_resolved_config

    cfg = C.load_config(None, ["model.hidden_size=32", "model.num_heads=2", "model.num_hidden_layers=1",
                               f"model.vocab_size={family_vocab}", "data.seq_len=32", "data.batch_size=2",
                               "data.max_docs=60", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    save_resolved_config(cfg, path)
    return cfg


@pytest.mark.parametrize("family", ["retnet", pytest.param("mamba", marks=pytest.mark.slow),
                                    pytest.param("mamba2", marks=pytest.mark.slow)])
def test_eval_scores_a_converted_checkpoint_as_its_own_model(family, tmp_path, capsys):
    from gla_jax.cli import main as gla_main
    from gla_jax.train import data as data_lib
    from gla_jax.train.tokenizer import get_tokenizer

    model, ckpt = _converted(family, tmp_path)
    wd = tmp_path / "run"
    cfg = _eval_workdir(wd, 320)
    assert gla_main(["eval", "--workdir", str(wd), "--checkpoint", str(ckpt), "--seq-len", "32", "--batches", "1",
                     "--batch-size", "2"]) == 0
    res = json.loads(next((wd / "eval").glob("*.json")).read_text())
    # the reference: the same held-out rows through our model, next-token NLL in numpy (all positions < seq_len)
    _, val = data_lib.list_documents(cfg.data, get_tokenizer("byte"))
    batch = next(data_lib.make_batches(cfg.data, val, process_index=0, process_count=1, shuffle=False, repeat=True,
                                       batch_size=2, seq_len=32))
    tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    logits = np.asarray(nnx.jit(lambda m, i, s: m(i, segment_ids=s))(model, jnp.asarray(tokens),
                                                                       jnp.asarray(seg)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    want = float((nll * same).sum() / same.sum())
    # (the run's own model is GLA with other sizes: a loss from it could not match this one)
    assert res["tokens"] == int(same.sum()) and res["loss"] == pytest.approx(want, rel=1e-4)


def test_eval_refuses_a_converted_model_smaller_than_the_tokenizer(tmp_path, capsys):
    from gla_jax.cli import main as gla_main

    _, ckpt = _converted("mamba2", tmp_path, vocab=200)  # the run's byte tokenizer has 257 ids
    wd = tmp_path / "run"
    _eval_workdir(wd, 320)
    capsys.readouterr()
    assert gla_main(["eval", "--workdir", str(wd), "--checkpoint", str(ckpt), "--batches", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (JAX may warn first)
    assert err.startswith("gla-jax eval: error: --checkpoint:") and "vocabulary (200" in err and "data.tokenizer" in err


# ----------------------------------------------------------------------------------------------------- bad input


def test_unknown_model_type_is_one_line_naming_the_field_and_the_families(tmp_path, capsys):
    from gla_jax.cli import main as gla_main
    from gla_jax.convert import save_hf
    from gla_jax.models import families

    hf = save_hf(_random_model("mamba2"), tmp_path / "hf")
    raw = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**raw, "model_type": "hyena"}))
    capsys.readouterr()
    assert gla_main(["convert", "--from-hf", str(hf), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("gla-jax convert: error: --from-hf: model_type") and "'hyena'" in err
    assert all(f in err for f in families()) and not (tmp_path / "ck").exists()

    # a gla-jax checkpoint whose config names no registered family: every tool that loads it says so in one line
    ckpt = _save_checkpoint(_random_model("mamba2"), tmp_path / "ckpt")
    for name in ("config.json", "model_config.json"):
        d = json.loads((ckpt / name).read_text())
        (ckpt / name).write_text(json.dumps({**d, "model_type": "hyena"}))
    for argv in (["convert", "--to-hf", str(ckpt), "--out", str(tmp_path / "out")],
                 ["generate", "--checkpoint", str(ckpt), "--ids", "1,2"]):
        assert gla_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "model_type" in err and "'hyena'" in err
        assert all(f in err for f in families()), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # a field the family's config does not have: one line naming it (was a traceback)
    for name in ("config.json", "model_config.json"):
        d = json.loads((ckpt / name).read_text())
        (ckpt / name).write_text(json.dumps({**d, "model_type": "mamba2", "hiden_size": 32}))
    assert gla_main(["generate", "--checkpoint", str(ckpt), "--ids", "1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("gla-jax generate: error: --checkpoint:") and "'hiden_size'" in err


def test_to_hf_refuses_a_family_without_an_hf_map(tmp_path, capsys):
    """A registered family with no fla/HF counterpart (``hf_layout=None``) is one line naming it."""
    import dataclasses

    from gla_jax.cli import main as gla_main
    from gla_jax.models import MambaConfig
    from gla_jax.models.mamba import MambaForCausalLM, mamba_mixer_flops
    from gla_jax.models.registry import Family, register_family, unregister_family

    @dataclasses.dataclass(frozen=True)
    class LocalConfig(MambaConfig):
        model_type = "local-mamba"

    class LocalModel(MambaForCausalLM):
        config_class = LocalConfig

    register_family(Family("local-mamba", LocalConfig, LocalModel, mixer_flops=mamba_mixer_flops))
    try:
        config = LocalConfig(hidden_size=16, num_hidden_layers=1, state_size=4, vocab_size=11)
        model = nnx.eval_shape(lambda r: LocalModel(config, rngs=r), nnx.Rngs(0))
        for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            var.set_value(jnp.zeros(var.get_value().shape, jnp.float32))
        ckpt = _save_checkpoint(model, tmp_path / "ckpt")
        capsys.readouterr()
        assert gla_main(["convert", "--to-hf", str(ckpt), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("gla-jax convert: error: --to-hf:") and "'local-mamba'" in err
        assert "no fla/HF tensor map" in err
    finally:
        unregister_family("local-mamba")
