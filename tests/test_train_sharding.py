"""Mesh and logical-axis rules, the shard-mapped GLA op, and loss equality across meshes (8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gla_jax.train import config as C
from gla_jax.train import sharding as S
from reference import reference_gla

TINY = ["model.hidden_size=32", "model.num_heads=4", "model.num_hidden_layers=1", "model.vocab_size=320",
        "data.seq_len=64", "data.batch_size=8", "data.max_docs=60", "train.steps=5", "train.log_every=1",
        "train.eval_every=0", "train.progress=false", "train.sample_tokens=0", "checkpoint.enabled=false",
        "optim.warmup_steps=2", "optim.lr=1e-2"]


def _mesh(d, f, t):
    return S.make_mesh(C.load_config(None, [f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}"]).mesh)


def test_mesh_shape_resolution():
    m = C.load_config(None, ["mesh.data=-1", "mesh.tensor=2"]).mesh
    assert S.mesh_shape(m, 8) == (4, 1, 2)
    with pytest.raises(ValueError, match="^mesh"):
        S.mesh_shape(C.load_config(None, ["mesh.data=3", "mesh.tensor=-1"]).mesh, 8)
    with pytest.raises(ValueError, match="^mesh"):
        S.mesh_shape(C.load_config(None, ["mesh.data=4", "mesh.tensor=4"]).mesh, 8)
    mesh = _mesh(2, 2, 2)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == 8


def test_logical_rules():
    mesh = _mesh(2, 2, 2)
    R = S.PARAM_RULES
    assert S.logical_to_spec(("embed", "heads"), (64, 32), mesh, R) == P("fsdp", "tensor")
    assert S.logical_to_spec(("vocab", "embed"), (320, 64), mesh, R) == P("tensor", "fsdp")
    assert S.logical_to_spec(("batch", None), (8, 5), mesh, R) == P(("data", "fsdp"))
    # not divisible: keep the longest dividing prefix, else replicate
    assert S.logical_to_spec(("batch",), (2,), mesh, R) == P("data")
    assert S.logical_to_spec(("embed", "heads"), (63, 3), mesh, R) == P()
    assert S.logical_to_spec((None, "kv"), (16, 32), mesh, R) == P(None, "tensor")
    # a mesh axis is used once per spec; size-1 axes are dropped
    assert S.logical_to_spec(("heads", "mlp"), (8, 8), mesh, R) == P("tensor")
    assert S.logical_to_spec(("embed", "heads"), (64, 32), _mesh(8, 1, 1), R) == P()


def test_model_params_get_sharded():
    from flax import nnx

    from gla_jax.train.loop import build_model, model_config

    mcfg = model_config(C.load_config(None, TINY))
    abs_model = nnx.eval_shape(lambda: build_model(mcfg, 0))
    sh = S.state_shardings(nnx.state(abs_model, nnx.Param), _mesh(1, 2, 4))
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(sh)}
    q = [v for k, v in flat.items() if k.endswith("q_proj/kernel")][0]
    o = [v for k, v in flat.items() if k.endswith("o_proj/kernel")][0]
    emb = [v for k, v in flat.items() if k.endswith("embedding")][0]
    norm = [v for k, v in flat.items() if k.endswith("attn_norm/weight")][0]
    # the blocks' parameters are stacked [L, ...]: the leading "layers" axis stays unsharded
    assert q.spec == P(None, "fsdp", "tensor") and o.spec == P(None, "tensor", "fsdp")
    assert emb.spec == P("tensor", "fsdp") and norm.spec == P()


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4), (8, 1, 1)])
def test_shard_mapped_gla_matches_reference(shape):
    mesh = _mesh(*shape)
    B, T, H, K, V = 8, 40, 4, 8, 16
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)))
    seg = jnp.asarray(np.repeat(np.array([[1] * 15 + [2] * 20 + [3] * 5]), B, 0), jnp.int32)
    op = S.shard_mapped_gla(mesh)
    f = jax.jit(lambda *a: op(*a, segment_ids=seg, output_final_state=True, impl="chunk", chunk_size=16))
    with jax.set_mesh(mesh):
        o, s = f(q, k, v, g)
    ro, rs = reference_gla(q, k, v, g, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(o), ro, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(s), rs, rtol=1e-4, atol=1e-4)


def _run(extra):
    from gla_jax.train.loop import Trainer

    cfg = C.load_config(None, TINY + extra)
    import tempfile

    with tempfile.TemporaryDirectory() as wd:
        tr = Trainer(cfg, wd, log=lambda *_: None)
        out = tr.run()
        first_batch = tr.make_data()
        return out, tr, next(first_batch)


@pytest.mark.parametrize("shape, accum", [((1, 1, 1), 1), ((8, 1, 1), 1), ((2, 2, 2), 1), ((1, 2, 4), 2)])
def test_losses_agree_across_meshes_and_with_numpy(shape, accum):
    """First 5 losses on each mesh (the last one also with 2 accumulated micro-batches) equal, to rel 1e-5, the
    losses of the unsharded run, whose step-1 loss is checked against a float64 numpy cross-entropy."""
    extra = [f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.tensor={shape[2]}", f"optim.grad_accum={accum}"]
    out, tr, batch = _run(extra)
    losses = np.asarray([out["losses"][i] for i in range(1, 6)])
    _MESH_LOSSES[(shape, accum)] = losses
    if shape == (1, 1, 1):
        from gla_jax.train.data import loss_mask
        from gla_jax.train.loop import build_model

        model = build_model(tr.mcfg, tr.cfg.train.seed)
        logits = np.asarray(model(jnp.asarray(batch["tokens"]), segment_ids=jnp.asarray(batch["segment_ids"])),
                            np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        tgt = np.concatenate([batch["tokens"][:, 1:], batch["tokens"][:, :1]], axis=1)
        nll = lse - np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
        m = loss_mask(batch["segment_ids"])
        assert np.isclose(losses[0], (nll * m).sum() / m.sum(), rtol=1e-5)
        assert losses[-1] < losses[0]
        return
    base = _MESH_LOSSES.get(((1, 1, 1), 1))
    if base is None:
        base, _, _ = _run(["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
        base = _MESH_LOSSES[((1, 1, 1), 1)] = np.asarray([base["losses"][i] for i in range(1, 6)])
    np.testing.assert_allclose(losses, base, rtol=1e-5)


_MESH_LOSSES = {}


def test_model_calls_gla_through_shard_map():
    """Inside the trainer's mesh context the GLA layers run the operator under jax.shard_map (batch and heads split),
    and outside it they call the plain operator again."""
    from gla_jax.train import loop

    cfg = C.load_config(None, TINY + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    tr = loop.Trainer(cfg, "/nonexistent-unused", log=lambda *_: None)
    tok = jax.ShapeDtypeStruct((8, 64), jnp.int32)
    with loop.mesh_context(tr.mesh):
        inside = str(jax.make_jaxpr(tr._apply)(tr.abs_params, tok, tok))
    outside = str(jax.make_jaxpr(tr._apply)(tr.abs_params, tok, tok))
    assert "shard_map" in inside and "shard_map" not in outside
