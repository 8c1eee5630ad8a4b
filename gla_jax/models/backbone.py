"""The decoder backbone every family shares: embeddings -> L pre-norm blocks (stacked, scanned) -> RMSNorm -> head.

A family supplies only its token mixer (docs/design.md §4). A mixer class has:

- ``from_config(config, *, rngs)`` (classmethod): the mixer of one layer;
- ``uses_slots`` (class attribute): True when its decoding cache has one slot per position (attention: needs
  ``max_len``), False when its state has a fixed size (GLA: ``max_len`` is ignored);
- ``init_cache(batch_size, max_len=None)``: one layer's empty decoding cache (a pytree of arrays);
- ``mix(x, ctx, cache) -> (y, new_cache)``: x ``[B, T, D]`` -> y ``[B, T, D]``; ``ctx`` is a :class:`MixContext`;
  with ``cache=None`` (training) it returns ``(y, None)``.

Layers are created once under ``nnx.vmap``: every parameter carries a leading layer axis ``[L, ...]`` (logical name
``"layers"``), and the forward pass runs them with ``jax.lax.scan`` (``config.scan_layers``, the default: the
compiled program does not grow with depth) or a Python loop over the same stacked parameters. With
``config.remat`` each layer is rematerialised in the backward pass under the ``jax.checkpoint`` policy named by
``config.remat_policy``.

Cache protocol (both families): ``model.init_cache(batch, max_len=None)`` returns
``{"layers": per-layer caches stacked on a leading [L] axis, "index": int32 tokens consumed}`` plus, for slot
caches, ``"segments": [B, max_len] int32`` (document id of each filled slot, -1 empty). ``model(ids, cache=c)``
returns ``(logits, new_cache)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.mlp import GatedMLP
from gla_jax.layers.norm import RMSNorm
from gla_jax.layers.sharding import constrain
from gla_jax.models.head import lm_head, lm_logits, token_embeddings

ACT = ("batch", "seq", "embed")
LAYER_AXIS = "layers"  # logical name of the stacked parameters' leading axis (never sharded by the trainer)


def check_tokens(input_ids, segment_ids):
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an integer [B, T] array, got {input_ids.dtype}{list(input_ids.shape)}")
    if segment_ids is not None and (segment_ids.shape != input_ids.shape
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be an integer array of shape {input_ids.shape}, got "
                         f"{segment_ids.dtype}{list(segment_ids.shape)}")


@dataclasses.dataclass(frozen=True)
class MixContext:
    """What every layer's mixer sees besides its input and its own cache.

    segment_ids: [B, T] int or None (packed documents); positions: [B, T] int or None (default: arange from
    ``index``); impl: operator override (GLA) or None; index: int32 scalar, tokens already in the cache (None
    without a cache); slot_segments: [B, S] int32 document id per cache slot, already holding the new tokens (slot
    caches only)."""

    segment_ids: Any = None
    positions: Any = None
    impl: str | None = None
    index: Any = None
    slot_segments: Any = None


class DecoderBlock(nnx.Module):
    """Pre-norm block ``x += attn(attn_norm(x)); x += mlp(mlp_norm(x))`` (fla's names; ``attn`` is the family's
    mixer, ``mixer_class`` of the subclass). x: [B, T, D] in the compute dtype. A config whose
    ``mlp_intermediate_size`` is 0 has no MLP sub-block (``mlp_norm`` and ``mlp`` are None: Mamba's blocks)."""

    mixer_class: type = None

    def __init__(self, config, *, rngs: nnx.Rngs):
        c = config
        dt, pdt = c.compute_dtype, c.params_dtype
        self.attn_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=dt, param_dtype=pdt)
        self.attn = self.mixer_class.from_config(c, rngs=rngs)
        if c.mlp_intermediate_size:
            self.mlp_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=dt, param_dtype=pdt)
            self.mlp = GatedMLP(c.hidden_size, c.mlp_intermediate_size, hidden_act=c.hidden_act,
                                initializer_range=c.initializer_range, dtype=dt, param_dtype=pdt, rngs=rngs)
        else:
            self.mlp_norm = self.mlp = None

    def __call__(self, x, ctx: MixContext, cache=None):
        """-> (x [B, T, D], new layer cache or None)."""
        h, new_cache = self.attn.mix(self.attn_norm(x), ctx, cache)
        x = constrain(x + h.astype(x.dtype), ACT)
        if self.mlp is not None:
            x = constrain(x + self.mlp(self.mlp_norm(x)).astype(x.dtype), ACT)
        return x, new_cache


def stacked_blocks(block_class, config, num_layers: int, *, rngs: nnx.Rngs):
    """``num_layers`` blocks created under ``nnx.vmap``: one module whose parameters are ``[L, ...]`` with logical
    axis names ``("layers", ...)``; each layer gets its own split of ``rngs``."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, axis_size=num_layers, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
    def make(r):
        return block_class(config, rngs=r)

    return make(rngs)


class DecoderModel(nnx.Module):
    """Embeddings, stacked blocks and final norm: ``input_ids [B, T] -> hidden [B, T, D]`` (compute dtype).
    ``.layers`` is ONE block module holding all layers' parameters on a leading axis; :meth:`layer` gives a
    read-only per-layer view."""

    def __init__(self, config, block_class, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.num_layers = int(c.num_hidden_layers)
        self.embeddings = token_embeddings(c, rngs=rngs)
        self.layers = stacked_blocks(block_class, c, self.num_layers, rngs=rngs)
        self.norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=c.compute_dtype, param_dtype=c.params_dtype)

    def layer(self, i: int):
        """Layer ``i`` as a separate block (a copy of its parameter slices: reading only)."""
        if not 0 <= i < self.num_layers:
            raise ValueError(f"i: layer index must be in [0, {self.num_layers}), got {i}")
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    def run_layers(self, x, ctx: MixContext, caches=None):
        """x [B, T, D] through every layer; caches: stacked per-layer caches or None. -> (x, new caches or None)."""
        c = self.config
        graphdef, state = nnx.split(self.layers)

        def one(x, layer_state, layer_cache):
            return nnx.merge(graphdef, layer_state)(x, ctx, layer_cache)

        if c.remat and caches is None:
            one = jax.checkpoint(one, policy=c.remat_policy_fn, prevent_cse=not c.scan_layers)
        if c.scan_layers:
            return jax.lax.scan(lambda h, xs: one(h, *xs), x, (state, caches))
        new = []
        for i in range(self.num_layers):
            take = lambda a: a[i]  # noqa: E731 - slice layer i of a stacked pytree
            x, lc = one(x, jax.tree.map(take, state), None if caches is None else jax.tree.map(take, caches))
            new.append(lc)
        return x, (None if caches is None else jax.tree.map(lambda *a: jnp.stack(a), *new))

    def __call__(self, input_ids, ctx: MixContext, caches=None):
        x = constrain(self.embeddings(input_ids), ACT)
        x, caches = self.run_layers(x, ctx, caches)
        return self.norm(x), caches


class CausalLM(nnx.Module):
    """A causal language model on the shared backbone; a family subclasses it setting ``config_class`` and
    ``mixer_class`` (its token mixer); the subclass then gets ``block_class``, the :class:`DecoderBlock` subclass of
    that mixer, named after it (``GLAForCausalLM`` -> ``GLABlock``).

    ``model(input_ids [B, T] int, *, segment_ids=None) -> logits [B, T, vocab] float32``. Attributes: ``.model``
    (:class:`DecoderModel`: ``.embeddings``, ``.layers``, ``.norm``) and ``.lm_head`` (None when
    ``tie_word_embeddings``: logits then use the embedding matrix)."""

    config_class: type = None
    mixer_class: type = None
    block_class: type = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "mixer_class" in cls.__dict__:
            name = cls.__name__.removesuffix("ForCausalLM") + "Block"
            cls.block_class = type(name, (DecoderBlock,), {"mixer_class": cls.mixer_class,
                                                           "__module__": cls.__module__, "__qualname__": name})

    def __init__(self, config, *, rngs: nnx.Rngs):
        if not isinstance(config, self.config_class):
            raise ValueError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.model = DecoderModel(config, self.block_class, rngs=rngs)
        self.lm_head = lm_head(config, rngs=rngs)

    def logits(self, hidden):
        """hidden [..., D] -> logits [..., vocab] float32."""
        return lm_logits(hidden, self.model.embeddings, self.lm_head)

    def init_cache(self, batch_size: int, max_len: int | None = None):
        """Empty decoding cache (module docstring): fixed-size states ignore ``max_len``; slot caches need it."""
        mixer = self.mixer_class
        if mixer.uses_slots and max_len is None:
            raise ValueError(f"max_len: a {self.config.model_type} cache has one slot per position; pass max_len")
        one = self.model.layers.attn.init_cache(batch_size, max_len)
        L = self.model.num_layers
        cache = {"layers": jax.tree.map(lambda a: jnp.repeat(a[None], L, axis=0), one),
                 "index": jnp.zeros((), jnp.int32)}
        if mixer.uses_slots:
            cache["segments"] = jnp.full((batch_size, max_len), -1, jnp.int32)
        return cache

    def __call__(self, input_ids, *, segment_ids=None, positions=None, cache=None, return_cache: bool = False,
                 impl: str | None = None):
        """input_ids: [B, T] int; segment_ids: [B, T] int (packed documents / padding); positions: [B, T] int
        (rotary families; default arange continuing from the cache); impl: operator override (GLA).

        With ``cache`` (from :meth:`init_cache` or a previous call) the tokens continue it and ``(logits,
        new_cache)`` is returned; ``return_cache`` without a cache starts from an empty one of ``T`` slots."""
        check_tokens(input_ids, segment_ids)
        B, T = input_ids.shape
        if cache is None and return_cache:
            cache = self.init_cache(B, T)
        ctx = MixContext(segment_ids=segment_ids, positions=positions, impl=impl)
        if cache is None:
            h, _ = self.model(input_ids, ctx)
            return self.logits(h)
        index = cache["index"]
        new_cache = {"index": index + T}
        if "segments" in cache:
            seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
            new_cache["segments"] = jax.lax.dynamic_update_slice(cache["segments"], seg, (0, index))
        ctx = dataclasses.replace(ctx, index=index, slot_segments=new_cache.get("segments"))
        h, new_cache["layers"] = self.model(input_ids, ctx, cache["layers"])
        return self.logits(h), new_cache


class RecurrentLayerMixer:
    """Mixin that adapts a baseline layer with an O(1) recurrent state (``__call__(x, *, segment_ids, cache,
    return_cache)``, ``init_cache(batch)``, ``step(x_t, cache)``) to the mixer protocol: no KV slots, ``max_len``
    ignored, and a one-token call with a cache takes the layer's recurrent ``step`` (it continues the cache's document
    whatever its segment id). Put it first among the bases: ``class M(RecurrentLayerMixer, Layer)``."""

    uses_slots = False

    def init_cache(self, batch_size: int, max_len: int | None = None):
        return super().init_cache(batch_size)

    def mix(self, x, ctx: MixContext, cache=None):
        if cache is None:
            return self(x, segment_ids=ctx.segment_ids), None
        if x.shape[1] == 1:
            y, new_cache = self.step(x[:, 0], cache)
            return y[:, None], new_cache
        return self(x, segment_ids=ctx.segment_ids, cache=cache, return_cache=True)
