"""The Transformer++ family (LLaMA-style, the paper's baseline): RoPE softmax attention with a KV cache on the
shared decoder backbone (fla ``TransformerForCausalLM`` layout), registered in one line at the bottom."""

from __future__ import annotations

from gla_jax.layers.attention import Attention
from gla_jax.models.backbone import CausalLM, MixContext
from gla_jax.models.config import TransformerConfig
from gla_jax.models.registry import Family, HFTensor, paper_presets, register_family


class AttentionMixer(Attention):
    """Attention as a backbone mixer: its cache has one key/value slot per position (``max_len`` required)."""

    uses_slots = True

    @classmethod
    def from_config(cls, c: TransformerConfig, *, rngs):
        return cls(c.hidden_size, c.num_heads, c.num_kv_heads, qkv_bias=c.qkv_bias, qk_norm=c.qk_norm,
                   rope_theta=c.rope_theta, norm_eps=c.norm_eps, initializer_range=c.initializer_range,
                   implementation=c.attention_impl, dtype=c.compute_dtype, param_dtype=c.params_dtype, rngs=rngs)

    def init_cache(self, batch_size: int, max_len: int | None = None):
        """{'k': [B, Hkv, Dh, S], 'v': [B, Hkv, S, Dh]} in the compute dtype, S = ``max_len``."""
        if max_len is None:
            raise ValueError("max_len: an attention cache needs the number of positions")
        return super().init_cache(batch_size, max_len)

    def mix(self, x, ctx: MixContext, cache=None):
        if cache is None:
            return self(x, positions=ctx.positions, segment_ids=ctx.segment_ids), None
        return self(x, positions=ctx.positions, cache=cache, cache_index=ctx.index, cache_segments=ctx.slot_segments)


class TransformerForCausalLM(CausalLM):
    """Transformer++ LM. ``model(input_ids [B, T] int, *, segment_ids=None) -> logits [B, T, vocab] float32``;
    decoding uses a KV cache of ``max_len`` slots (see :class:`CausalLM`)."""

    config_class = TransformerConfig
    mixer_class = AttentionMixer


TransformerBlock = TransformerForCausalLM.block_class


def attention_mixer_flops(c: TransformerConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one attention layer: q/k/v/o projections, ``q kᵀ`` and ``p v`` over on average
    ``seq_len / 2`` causal keys."""
    D, H = c.hidden_size, c.num_heads
    kv = (c.num_kv_heads or H) * (D // H)
    return 2 * (D * D + 2 * D * kv + D * D) + 2 * 2 * (seq_len / 2) * D


def transformer_hf_layout(c: TransformerConfig, raw: dict | None = None) -> dict[str, HFTensor]:
    """fla ``TransformerForCausalLM`` tensor name -> our stacked parameter (see :class:`HFTensor`)."""
    D, Dh = c.hidden_size, c.head_dim
    kv = (c.num_kv_heads or c.num_heads) * Dh
    rows = [("attn_norm.weight", ("attn_norm", "weight"), "plain", (D,))]
    for n, out in (("q", D), ("k", kv), ("v", kv)):
        rows.append((f"attn.{n}_proj.weight", ("attn", f"{n}_proj", "kernel"), "linear", (out, D)))
        if c.qkv_bias:
            rows.append((f"attn.{n}_proj.bias", ("attn", f"{n}_proj", "bias"), "plain", (out,)))
    rows.append(("attn.o_proj.weight", ("attn", "o_proj", "kernel"), "linear", (D, D)))
    if c.qk_norm:
        rows += [("attn.q_norm.weight", ("attn", "q_norm", "weight"), "plain", (Dh,)),
                 ("attn.k_norm.weight", ("attn", "k_norm", "weight"), "plain", (Dh,))]
    return HFTensor.decoder_layout(c, rows, mlp_width=c.mlp_intermediate_size, vocab=c.vocab_size)


register_family(Family("transformer", TransformerConfig, TransformerForCausalLM, mixer_flops=attention_mixer_flops,
                       hf_layout=transformer_hf_layout,
                       presets=paper_presets("transformer", heads_340m=16, heads_1_3b=32)))
