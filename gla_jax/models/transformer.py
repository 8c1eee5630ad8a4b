"""Transformer++ (LLaMA-style) language model, the paper's baseline: RoPE, RMSNorm, SwiGLU, softmax attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.attention import Attention
from gla_jax.layers.mlp import GatedMLP
from gla_jax.layers.norm import RMSNorm
from gla_jax.layers.sharding import constrain
from gla_jax.models.config import TransformerConfig
from gla_jax.models.head import lm_head, lm_logits, token_embeddings
from gla_jax.models.gla import ACT, check_tokens


class TransformerBlock(nnx.Module):
    """Pre-norm block: ``x += attn(attn_norm(x)); x += mlp(mlp_norm(x))``."""

    def __init__(self, config: TransformerConfig, layer_idx: int = 0, *, rngs: nnx.Rngs):
        c = config
        dt, pdt = c.compute_dtype, c.params_dtype
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=dt, param_dtype=pdt)
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, qkv_bias=c.qkv_bias, qk_norm=c.qk_norm,
                              rope_theta=c.rope_theta, norm_eps=c.norm_eps, initializer_range=c.initializer_range,
                              implementation=c.attention_impl, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.mlp_norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=dt, param_dtype=pdt)
        self.mlp = GatedMLP(c.hidden_size, c.mlp_intermediate_size, hidden_act=c.hidden_act,
                            initializer_range=c.initializer_range, dtype=dt, param_dtype=pdt, rngs=rngs)

    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, cache_index=None, cache_segments=None):
        out = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids, cache=cache,
                        cache_index=cache_index, cache_segments=cache_segments)
        h, new_cache = out if cache is not None else (out, None)
        x = constrain(x + h.astype(x.dtype), ACT)
        x = constrain(x + self.mlp(self.mlp_norm(x)).astype(x.dtype), ACT)
        return (x, new_cache) if cache is not None else x


def _block_forward(block, x, positions, segment_ids):
    return block(x, positions=positions, segment_ids=segment_ids)


class TransformerModel(nnx.Module):
    """Embeddings, blocks and final norm; ``input_ids [B, T] -> hidden [B, T, D]``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embeddings = token_embeddings(c, rngs=rngs)
        self.layers = nnx.List([TransformerBlock(c, i, rngs=rngs) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, eps=c.norm_eps, dtype=c.compute_dtype, param_dtype=c.params_dtype)


class TransformerForCausalLM(nnx.Module):
    """Transformer++ LM. ``model(input_ids [B, T] int, *, segment_ids=None) -> logits [B, T, vocab] float32``.

    Same layout as GLAForCausalLM (``.model.embeddings``, ``.model.layers``, ``.model.norm``, ``.lm_head`` or
    tied). Decoding uses a KV cache: :meth:`init_cache` and ``model(ids, cache=..., segment_ids=...)``.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.model = TransformerModel(config, rngs=rngs)
        self.lm_head = lm_head(config, rngs=rngs)

    def logits(self, hidden):
        """hidden [..., D] -> logits [..., vocab] float32."""
        return lm_logits(hidden, self.model.embeddings, self.lm_head)

    def init_cache(self, batch_size: int, max_len: int):
        """Empty KV cache for ``max_len`` positions: {'layers': [{'k','v'}] per layer, 'segments': [B, S] int32
        (-1 = empty slot), 'index': int32 number of filled slots}. Memory grows linearly with ``max_len``."""
        return {"layers": [blk.attn.init_cache(batch_size, max_len) for blk in self.model.layers],
                "segments": jnp.full((batch_size, max_len), -1, jnp.int32), "index": jnp.zeros((), jnp.int32)}

    def __call__(self, input_ids, *, segment_ids=None, positions=None, cache=None, return_cache: bool = False):
        """input_ids: [B, T] int; segment_ids: [B, T] int (packed documents / padding); positions: [B, T] int for
        RoPE (default: arange, continuing from the cache). With ``cache`` (from :meth:`init_cache`), the tokens
        are appended to it and (logits, new_cache) is returned."""
        check_tokens(input_ids, segment_ids)
        B, T = input_ids.shape
        m = self.model
        x = constrain(m.embeddings(input_ids), ACT)
        if cache is None:
            if return_cache:
                raise ValueError("return_cache needs a cache: pass cache=model.init_cache(batch, max_len)")
            for layer in m.layers:
                if self.config.remat:
                    x = nnx.remat(_block_forward)(layer, x, positions, segment_ids)
                else:
                    x = layer(x, positions=positions, segment_ids=segment_ids)
            return self.logits(m.norm(x))
        index = cache["index"]
        seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        segments = jax.lax.dynamic_update_slice(cache["segments"], seg, (0, index))
        new_layers = []
        for layer, lc in zip(m.layers, cache["layers"]):
            x, lc = layer(x, positions=positions, cache=lc, cache_index=index, cache_segments=segments)
            new_layers.append(lc)
        logits = self.logits(m.norm(x))
        return logits, {"layers": new_layers, "segments": segments, "index": index + T}
