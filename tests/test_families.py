"""A new model family is one file plus one registration: a toy family (a causal-mean token mixer) defined and
registered here is built by the registry, trained by the trainer, counted by the FLOP counter and decoded by
``generate``, then unregistered. Also the registry's own errors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gla_jax.layers.sharding import with_axes
from gla_jax.models import registry
from gla_jax.models.backbone import CausalLM
from gla_jax.models.config import ModelConfig
from reference import rel_err
from train_checks import one_step_losses

# ---------------------------------------------------------------------------------------------------------------
# the whole toy family: what one new file would hold


@dataclasses.dataclass(frozen=True)
class MeanConfig(ModelConfig):
    """Config of the toy family (the backbone's shared fields plus its own)."""

    model_type = "causal-mean"

    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_heads: int = 1
    num_kv_heads: int | None = None
    hidden_ratio: int | None = 4
    intermediate_size: int | None = 64
    hidden_act: str = "swish"
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    vocab_size: int = 320
    attnres_block_size: int | None = None

    def __post_init__(self):
        self._check_common()


class CausalMean(nnx.Module):
    """y_t = o_proj(mean of v_proj(x_s) over the tokens s <= t of t's document). Cache: the running sum [B, D] and
    count [B] of the last document (a fixed-size state: max_len is ignored)."""

    uses_slots = False

    def __init__(self, c, *, rngs):
        init = nnx.initializers.normal(c.initializer_range)
        kw = dict(use_bias=False, dtype=c.compute_dtype, param_dtype=c.params_dtype, rngs=rngs)
        self.v_proj = nnx.Linear(c.hidden_size, c.hidden_size, kernel_init=with_axes(init, ("embed", "heads")), **kw)
        self.o_proj = nnx.Linear(c.hidden_size, c.hidden_size, kernel_init=with_axes(init, ("heads", "embed")), **kw)
        self.width = c.hidden_size

    @classmethod
    def from_config(cls, c, *, rngs):
        return cls(c, rngs=rngs)

    def init_cache(self, batch_size, max_len=None):
        return {"sum": jnp.zeros((batch_size, self.width)), "count": jnp.zeros((batch_size,))}

    def mix(self, x, ctx, cache=None):
        B, T, _ = x.shape
        v = self.v_proj(x).astype(jnp.float32)
        seg = jnp.zeros((B, T), jnp.int32) if ctx.segment_ids is None else ctx.segment_ids
        m = ((seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))).astype(jnp.float32)
        total, count = jnp.einsum("bts,bsd->btd", m, v), m.sum(-1)
        new_cache = None
        if cache is not None:  # the cache continues the call's first document
            first, last = (seg == seg[:, :1]).astype(jnp.float32), (seg == seg[:, -1:]).astype(jnp.float32)
            total = total + first[..., None] * cache["sum"][:, None]
            count = count + first * cache["count"][:, None]
            same = (seg[:, 0] == seg[:, -1]).astype(jnp.float32)
            new_cache = {"sum": jnp.einsum("bt,btd->bd", last, v) + same[:, None] * cache["sum"],
                         "count": last.sum(-1) + same * cache["count"]}
        return self.o_proj((total / count[..., None]).astype(x.dtype)), new_cache


class MeanForCausalLM(CausalLM):
    config_class = MeanConfig
    mixer_class = CausalMean


TOY = registry.Family("causal-mean", MeanConfig, MeanForCausalLM,
                      mixer_flops=lambda c, seq_len: 2 * 2 * c.hidden_size ** 2,
                      presets={"causal-mean-tiny": dict(hidden_size=32, num_hidden_layers=2)})

# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def toy():
    registry.register_family(TOY)  # the one registration
    try:
        yield TOY
    finally:
        registry.unregister_family(TOY.name)
    assert "causal-mean" not in registry.families() and "causal-mean-tiny" not in registry.PRESETS


def _random(model, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(scale * rng.standard_normal(var.get_value().shape), jnp.float32))
    return model


def _numpy_logits(model, ids, seg):
    """float64 forward of the toy model written out per token (an independent reference)."""
    P = lambda v: np.asarray(v.get_value(), np.float64)  # noqa: E731
    rms = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * w  # noqa: E731
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    E = P(model.model.embeddings.embedding)
    x = E[ids]
    for i in range(model.model.num_layers):
        blk = model.model.layer(i)
        h = rms(x, P(blk.attn_norm.weight)) @ P(blk.attn.v_proj.kernel)
        mean = np.stack([[h[b, [s for s in range(t + 1) if seg[b, s] == seg[b, t]]].mean(0)
                          for t in range(ids.shape[1])] for b in range(ids.shape[0])])
        x = x + mean @ P(blk.attn.o_proj.kernel)
        h = rms(x, P(blk.mlp_norm.weight))
        x = x + (silu(h @ P(blk.mlp.gate_proj.kernel)) * (h @ P(blk.mlp.up_proj.kernel))) @ P(blk.mlp.down_proj.kernel)
    return rms(x, P(model.model.norm.weight)) @ E.T


def test_toy_family_builds_from_the_registry_and_matches_numpy(toy):
    from gla_jax.models import build_model, config_from_dict, family_of, get_config

    config = get_config("causal-mean-tiny", vocab_size=50)
    assert family_of(config) is toy and config_from_dict(config.to_dict()) == config
    model = _random(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0))))
    assert isinstance(model, MeanForCausalLM) and model.model.layers.attn.v_proj.kernel.shape == (2, 32, 32)
    ids = np.random.default_rng(1).integers(0, 50, (2, 7))
    seg = np.array([[1, 1, 1, 2, 2, 2, 2], [3] * 7])
    logits = nnx.jit(lambda m, i, s: m(i, segment_ids=s))(model, jnp.asarray(ids), jnp.asarray(seg))
    assert rel_err(logits, _numpy_logits(model, ids, seg)) < 1e-5


def test_toy_family_generates_like_teacher_forcing(toy):
    from gla_jax.generate import generate
    from gla_jax.models import build_model

    model = _random(nnx.eval_shape(lambda: build_model(MeanConfig(vocab_size=40), rngs=nnx.Rngs(0))), seed=3)
    prompts, n = [[5, 7, 1], [2, 9, 4, 4, 8]], 4
    out = generate(model, prompts, max_new_tokens=n).sequences()
    forward = nnx.jit(lambda m, i: m(i))
    for prompt, got in zip(prompts, out):  # greedy by re-running the whole sequence (causal: later slots unused)
        buf = np.zeros((1, 9), np.int32)
        buf[0, :len(prompt)] = prompt
        for t in range(len(prompt), len(prompt) + n):
            buf[0, t] = int(np.argmax(np.asarray(forward(model, jnp.asarray(buf)))[0, t - 1]))
        assert got == list(buf[0, len(prompt):len(prompt) + n])


_TRAIN = ["model.arch=causal-mean", "model.hidden_size=32", "model.num_hidden_layers=2", "model.vocab_size=320",
          "data.seq_len=32", "data.batch_size=4", "data.max_docs=20", "train.steps=3", "train.log_every=1",
          "train.eval_every=0", "train.progress=false", "train.sample_tokens=0", "checkpoint.enabled=false",
          "optim.warmup_steps=0", "optim.lr=3e-2", "mesh.data=1"]


def test_toy_family_train_step_and_flops(toy):
    """The trainer's config resolution and model build take the toy family from the registry; one step of the
    trainer's optimizer on the trainer's loss lowers the loss; FLOPs = 2 per multiply-add of every matrix."""
    from gla_jax.train import config as C
    from gla_jax.train import flops
    from gla_jax.train import model as loop

    cfg = C.load_config(None, _TRAIN)
    mcfg = loop.model_config(cfg)
    assert isinstance(mcfg, MeanConfig) and mcfg.num_hidden_layers == 2
    model = nnx.jit(lambda: loop.build_model(mcfg, 0))()
    before, after = one_step_losses(model, cfg.optim)
    assert abs(float(before) - math.log(320)) < 0.1 and float(after) < float(before) - 0.05
    abstract = nnx.eval_shape(lambda: loop.build_model(mcfg, 0))
    matmul = sum(math.prod(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
                 if len(v.shape) - ("layers" in map(str, p)) == 2)  # stacked [L, in, out] kernels: L matrices
    assert math.isclose(flops.forward_flops_per_token(mcfg, 32), 2 * matmul, rel_tol=1e-12)  # tied head included


@pytest.mark.slow
def test_toy_family_trains_with_the_trainer(toy, tmp_path):
    from gla_jax.train import config as C
    from gla_jax.train import flops
    from gla_jax.train import trainer as loop

    trainer = loop.Trainer(C.load_config(None, _TRAIN), tmp_path, log=lambda *_: None)
    assert isinstance(trainer.mcfg, MeanConfig)
    assert trainer.flops_per_token == 3 * flops.forward_flops_per_token(trainer.mcfg, 32)
    losses = [v for _, v in sorted(trainer.run()["losses"].items())]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1  # starts near uniform, learns


def test_registry_errors(toy):
    from gla_jax.convert import save_hf
    from gla_jax.models import build_model, family_for_hf, get_family

    with pytest.raises(ValueError, match="already registered"):
        registry.register_family(toy)
    with pytest.raises(ValueError, match="model_type"):
        get_family("no-such-family")
    with pytest.raises(ValueError, match="model_type"):
        family_for_hf("no-such-family")
    with pytest.raises(ValueError, match="config_class"):
        registry.Family("other-name", MeanConfig, MeanForCausalLM, mixer_flops=lambda c, t: 0.0)

    @dataclasses.dataclass(frozen=True)
    class Unregistered(MeanConfig):
        model_type = "unregistered"

    with pytest.raises(ValueError, match="registered model family"):
        build_model(Unregistered(), rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: build_model(MeanConfig(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no fla/HF tensor map"):
        save_hf(model, "unused")


def test_resolve_config_and_config_from_dict():
    """A preset name, our dict form or a config resolve to the right family's config; arch must agree."""
    from gla_jax.models import GLAConfig, TransformerConfig, config_from_dict, get_config, resolve_config

    t = get_config("transformer-tiny")
    assert resolve_config("transformer-tiny", hidden_size=128) == t.replace(hidden_size=128)
    assert resolve_config(t.to_dict()) == t and config_from_dict(t.to_dict()) == t
    assert resolve_config({"hidden_size": 64, "num_heads": 2}, arch="gla") == GLAConfig(hidden_size=64, num_heads=2)
    assert resolve_config(None, arch="transformer") == TransformerConfig()
    with pytest.raises(ValueError, match="arch"):
        resolve_config("gla-tiny", arch="transformer")
    with pytest.raises(ValueError, match="model_type"):
        config_from_dict({"model_type": "no-such-family"})
