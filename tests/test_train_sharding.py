"""Mesh and logical-axis rules, kernel backends shard-mapped by the operator (no trace-time globals), and loss
equality across meshes (8 fake CPU devices)."""

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

    from gla_jax.train.model import build_model, model_config

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


@pytest.fixture
def probe_backend():
    """A kernel backend ``probe`` (``inner``: "triton" runs the Triton kernels in interpret mode, "recurrent" the
    recurrent form) that records the q shape it is traced with: inside ``jax.shard_map`` that is the local block."""
    from gla_jax.ops import registry

    seen = []

    def make(inner):
        def load():
            if inner == "triton":
                from gla_jax.kernels.triton import chunk_gla as run
            else:
                from gla_jax.ops.backends import _load_recurrent

                run = _load_recurrent()

            def fn(q, k, v, g, **kw):
                seen.append(q.shape)
                return run(q, k, v, g, **kw)

            return fn

        registry.register(registry.Backend("probe", load, platforms=("gpu",) if inner == "triton" else None))
        return seen

    yield make
    registry.unregister("probe")


def _gla_inputs(B=8, T=40, H=4, K=8, V=16):
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K)))
    s0 = jax.random.normal(ks[4], (B, H, K, V))
    seg = jnp.asarray(np.repeat(np.array([[1] * 15 + [2] * 20 + [3] * 5]), B, 0), jnp.int32)
    return q, k, v, g, s0, seg


def test_kernel_is_shard_mapped_even_when_first_traced_outside_the_mesh(probe_backend):
    """The old failure mode: a jitted function first traced outside the mesh kept the unsharded operator. Now gla
    reads the mesh set by ``jax.set_mesh`` (jit's cache keys on it), so the call under the mesh runs the Triton kernels
    (interpret mode) on local [B/4, T, H/2, K] blocks, and both calls agree with the float64 reference."""
    from gla_jax.ops import gla

    seen = probe_backend("triton")
    q, k, v, g, s0, seg = _gla_inputs()
    f = jax.jit(lambda q, k, v, g, s0: gla(q, k, v, g, initial_state=s0, segment_ids=seg, output_final_state=True,
                                           impl="probe", interpret=True, chunk_size=16,
                                           batch_axes=("data", "fsdp"), head_axes="tensor"))
    outside = f(q, k, v, g, s0)
    assert seen == [(8, 40, 4, 8)]
    with jax.set_mesh(_mesh(2, 2, 2)):
        inside = f(q, k, v, g, s0)
    assert seen == [(8, 40, 4, 8), (2, 40, 2, 8)]
    ro, rs = reference_gla(q, k, v, g, initial_state=s0, segment_ids=seg)
    for o, s in (outside, inside):
        np.testing.assert_allclose(np.asarray(o), ro, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(s), rs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, local", [((2, 2, 2), (2, 2)), ((1, 2, 4), (4, 1)), ((8, 1, 1), (1, 4))])
def test_gla_layer_passes_its_mesh_axes(probe_backend, shape, local):
    """Under the trainer's mesh context the GLA layer hands the operator the mesh axes of "batch" and "heads", so a
    kernel backend runs on local blocks (batch over data x fsdp, heads over tensor) and matches the unsharded layer."""
    from flax import nnx

    from gla_jax.layers.gla import GatedLinearAttention
    from gla_jax.train.trainer import mesh_context

    seen = probe_backend("recurrent")
    layer = GatedLinearAttention(32, num_heads=4, impl="probe", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 24, 32))
    graph, state = nnx.split(layer)
    f = jax.jit(lambda state, x: nnx.merge(graph, state)(x))
    with mesh_context(_mesh(*shape)):
        y = f(state, x)
    assert seen[-1][0] == local[0] and seen[-1][2] == local[1]
    with mesh_context(_mesh(1, 1, 1)):  # nothing to split: the kernel sees the whole batch
        y1 = f(state, x)
    assert seen[-1][0] == 8 and seen[-1][2] == 4
    np.testing.assert_allclose(np.asarray(y), np.asarray(y1), rtol=1e-5, atol=1e-5)


def _run(extra):
    from gla_jax.train.trainer import Trainer

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
        from gla_jax.train.model import build_model

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


def test_model_calls_kernel_backends_through_shard_map(probe_backend):
    """Inside the trainer's mesh context the GLA layers run a kernel backend under jax.shard_map (batch and heads
    split), outside it the plain kernel; the pure-JAX chunk form is left to XLA's partitioner (no shard_map)."""
    from gla_jax.train import trainer as loop

    seen = probe_backend("recurrent")
    tok = jax.ShapeDtypeStruct((8, 64), jnp.int32)
    for impl, mapped in (("probe", True), ("chunk", False)):
        cfg = C.load_config(None, TINY + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"model.impl={impl}"])
        tr = loop.Trainer(cfg, "/nonexistent-unused", log=lambda *_: None)
        with loop.mesh_context(tr.mesh):
            inside = str(jax.make_jaxpr(tr.apply)(tr.abs_params, tok, tok))
        outside = str(jax.make_jaxpr(tr.apply)(tr.abs_params, tok, tok))
        assert ("shard_map" in inside) == mapped and "shard_map" not in outside
    # (B, H) the kernel saw: local blocks under the 2x2x2 mesh (B 8 / data·fsdp, H 4 / tensor), then the whole problem
    assert [(x[0], x[2]) for x in seen] == [(2, 2), (8, 4)]


def test_mesh_that_leaves_devices_idle_warns(capfd):
    n = len(jax.devices())
    if n < 2:
        pytest.skip("needs several devices")
    mesh = _mesh(n - 1, 1, 1)
    assert mesh.devices.size == n - 1
    err = capfd.readouterr().err
    assert f"uses {n - 1} of the {n} devices" in err and err.strip().count("\n") == 0
    _mesh(-1, 1, 1)
    assert "idle" not in capfd.readouterr().err
