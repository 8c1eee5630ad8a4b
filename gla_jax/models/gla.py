"""The GLA language model: embeddings -> GLABlock × L -> RMSNorm -> lm_head (fla ``GLAForCausalLM`` layout)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.gla import GatedLinearAttention
from gla_jax.layers.mlp import GatedMLP
from gla_jax.layers.norm import RMSNorm
from gla_jax.layers.sharding import constrain
from gla_jax.models.config import GLAConfig
from gla_jax.models.head import lm_head, lm_logits, token_embeddings

ACT = ("batch", "seq", "embed")


def check_tokens(input_ids, segment_ids, vocab_size=None):
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an integer [B, T] array, got {input_ids.dtype}{list(input_ids.shape)}")
    if segment_ids is not None and (segment_ids.shape != input_ids.shape
                                    or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be an integer array of shape {input_ids.shape}, got "
                         f"{segment_ids.dtype}{list(segment_ids.shape)}")


class GLABlock(nnx.Module):
    """Pre-norm block: ``x += attn(attn_norm(x)); x += mlp(mlp_norm(x))``. x: [B, T, D] (compute dtype)."""

    def __init__(self, config: GLAConfig, layer_idx: int = 0, *, rngs: nnx.Rngs):
        c = config
        dt, pdt = c.compute_dtype, c.params_dtype
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=dt, param_dtype=pdt)
        self.attn = GatedLinearAttention(
            hidden_size=c.hidden_size, expand_k=c.expand_k, expand_v=c.expand_v, num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads, feature_map=c.feature_map, use_short_conv=c.use_short_conv,
            conv_size=c.conv_size, conv_bias=c.conv_bias, use_output_gate=c.use_output_gate, gate_fn=c.hidden_act,
            elementwise_affine=c.elementwise_affine, norm_eps=c.norm_eps,
            gate_logit_normalizer=c.gate_logit_normalizer, gate_low_rank_dim=c.gate_low_rank_dim,
            clamp_min=c.clamp_min, gate=c.gate, impl=c.impl, chunk_size=c.chunk_size,
            initializer_range=c.initializer_range, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=dt, param_dtype=pdt)
        self.mlp = GatedMLP(c.hidden_size, c.mlp_intermediate_size, hidden_act=c.hidden_act,
                            initializer_range=c.initializer_range, dtype=dt, param_dtype=pdt, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, cache=None, return_cache: bool = False, impl: str | None = None):
        out = self.attn(self.attn_norm(x), segment_ids=segment_ids, cache=cache, return_cache=return_cache,
                        impl=impl)
        h, new_cache = out if return_cache else (out, None)
        x = constrain(x + h.astype(x.dtype), ACT)
        x = constrain(x + self.mlp(self.mlp_norm(x)).astype(x.dtype), ACT)
        return (x, new_cache) if return_cache else x


def _block_forward(block, x, segment_ids):
    return block(x, segment_ids=segment_ids)


class GLAModel(nnx.Module):
    """Embeddings, blocks and final norm; ``input_ids [B, T] -> hidden [B, T, D]`` (compute dtype)."""

    def __init__(self, config: GLAConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embeddings = token_embeddings(c, rngs=rngs)
        self.layers = nnx.List([GLABlock(c, i, rngs=rngs) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=c.compute_dtype, param_dtype=c.params_dtype)

    def __call__(self, input_ids, *, segment_ids=None, cache=None, return_cache: bool = False,
                 impl: str | None = None):
        x = constrain(self.embeddings(input_ids), ACT)
        new_caches = []
        for i, layer in enumerate(self.layers):
            if return_cache or cache is not None:
                x, lc = layer(x, segment_ids=segment_ids, cache=None if cache is None else cache[i],
                              return_cache=True, impl=impl)
                new_caches.append(lc)
            elif self.config.remat:
                x = nnx.remat(_block_forward)(layer, x, segment_ids)
            else:
                x = layer(x, segment_ids=segment_ids, impl=impl)
        x = self.norm(x)
        return (x, new_caches) if return_cache else x


class GLAForCausalLM(nnx.Module):
    """GLA language model. ``model(input_ids [B, T] int, *, segment_ids=None) -> logits [B, T, vocab] float32``.

    Attributes: ``.model`` (:class:`GLAModel`: ``.embeddings``, ``.layers``, ``.norm``) and ``.lm_head`` (``None``
    when ``tie_word_embeddings``: logits then use the embedding matrix).
    """

    def __init__(self, config: GLAConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, GLAConfig):
            raise ValueError(f"config must be a GLAConfig, got {type(config).__name__}")
        self.config = config
        self.model = GLAModel(config, rngs=rngs)
        self.lm_head = lm_head(config, rngs=rngs)

    def logits(self, hidden):
        """hidden [..., D] -> logits [..., vocab] float32."""
        return lm_logits(hidden, self.model.embeddings, self.lm_head)

    def __call__(self, input_ids, *, segment_ids=None, cache=None, return_cache: bool = False,
                 impl: str | None = None):
        """input_ids: [B, T] int; segment_ids: [B, T] int (packed documents). With ``cache`` (list of per-layer
        states from :meth:`init_cache` or a previous call) and/or ``return_cache``, returns (logits, new_cache)."""
        check_tokens(input_ids, segment_ids)
        out = self.model(input_ids, segment_ids=segment_ids, cache=cache, return_cache=return_cache, impl=impl)
        if return_cache:
            h, new_cache = out
            return self.logits(h), new_cache
        return self.logits(out)

    def init_cache(self, batch_size: int):
        """Per-layer zero decoding states (see GatedLinearAttention.init_cache); size independent of context."""
        return [layer.attn.init_cache(batch_size) for layer in self.model.layers]
