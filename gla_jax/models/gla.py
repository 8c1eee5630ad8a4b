"""The GLA family: the Gated Linear Attention mixer on the shared decoder backbone (fla ``GLAForCausalLM`` layout),
its presets, FLOP count and fla tensor map, registered in one line at the bottom."""

from __future__ import annotations

from gla_jax.layers.gla import GatedLinearAttention
from gla_jax.models.backbone import CausalLM, MixContext
from gla_jax.models.config import GLAConfig
from gla_jax.models.registry import Family, HFTensor, paper_presets, register_family


class GLAMixer(GatedLinearAttention):
    """The GLA layer as a backbone mixer: a fixed-size recurrent state per layer (``max_len`` is ignored)."""

    uses_slots = False

    @classmethod
    def from_config(cls, c: GLAConfig, *, rngs):
        return cls(hidden_size=c.hidden_size, expand_k=c.expand_k, expand_v=c.expand_v, num_heads=c.num_heads,
                   num_kv_heads=c.num_kv_heads, feature_map=c.feature_map, use_short_conv=c.use_short_conv,
                   conv_size=c.conv_size, conv_bias=c.conv_bias, use_output_gate=c.use_output_gate,
                   gate_fn=c.hidden_act, elementwise_affine=c.elementwise_affine, norm_eps=c.norm_eps,
                   gate_logit_normalizer=c.gate_logit_normalizer, gate_low_rank_dim=c.gate_low_rank_dim,
                   clamp_min=c.clamp_min, gate=c.gate, impl=c.impl, chunk_size=c.chunk_size,
                   initializer_range=c.initializer_range, dtype=c.compute_dtype, param_dtype=c.params_dtype,
                   rngs=rngs)

    def init_cache(self, batch_size: int, max_len: int | None = None):
        """{'recurrent': [B, H, Dk/H, Dv/H] float32, 'conv': (q, k, v) tails [B, W-1, C] or None}."""
        return super().init_cache(batch_size)

    def mix(self, x, ctx: MixContext, cache=None):
        if cache is None:
            return self(x, segment_ids=ctx.segment_ids, impl=ctx.impl), None
        return self(x, segment_ids=ctx.segment_ids, cache=cache, return_cache=True, impl=ctx.impl)


class GLAForCausalLM(CausalLM):
    """GLA language model. ``model(input_ids [B, T] int, *, segment_ids=None) -> logits [B, T, vocab] float32``;
    decoding state per layer ``[B, H, Dk/H, Dv/H]`` whatever the context length (see :class:`CausalLM`)."""

    config_class = GLAConfig
    mixer_class = GLAMixer


GLABlock = GLAForCausalLM.block_class


def _dims(c: GLAConfig) -> dict[str, int]:
    D, H = c.hidden_size, c.num_heads
    Hkv = c.num_kv_heads or H
    dk, dv = int(round(D * c.expand_k)), int(round(D * c.expand_v))
    return dict(D=D, H=H, dk=dk, dv=dv, dk_kv=dk // H * Hkv, dv_kv=dv // H * Hkv)


def gla_mixer_flops(c: GLAConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one GLA layer: its projections (q, k, v, low-rank gate, output gate, output),
    short convolutions and the chunkwise operator (gla_jax.train.flops.gla_chunk_flops_per_token)."""
    from gla_jax.train.flops import gla_chunk_flops_per_token

    d = _dims(c)
    D, r = d["D"], c.gate_low_rank_dim
    proj = 2 * (D * d["dk"] + D * d["dk_kv"] + D * d["dv_kv"] + D * r + r * d["dk_kv"] + d["dv"] * D)
    if c.use_output_gate:
        proj += 2 * D * d["dv"]
    if c.use_short_conv:
        proj += 2 * c.conv_size * (d["dk"] + d["dk_kv"] + d["dv_kv"])
    return proj + gla_chunk_flops_per_token(d["H"], d["dk"] // d["H"], d["dv"] // d["H"], c.chunk_size)


def fused_norm_gate(raw_or_config) -> bool:
    """Whether fla names the per-head output norm ``attn.g_norm_swish_gate`` (fused RMSNorm + swish gate) rather
    than ``attn.g_norm``: with fuse_norm, a swish activation and the output gate."""
    get = (raw_or_config.get if isinstance(raw_or_config, dict)
           else lambda k, d=None: getattr(raw_or_config, k, d))
    return bool(get("fuse_norm", True)) and get("hidden_act", "swish") == "swish" and bool(get("use_output_gate", True))


def gla_hf_layout(c: GLAConfig, raw: dict | None = None) -> dict[str, HFTensor]:
    """fla tensor name -> our stacked parameter, layer, layout kind and fla shape. ``raw`` (the config.json read)
    picks the output norm's name (:func:`fused_norm_gate`); default: what fla builds from ``c``."""
    d = _dims(c)
    D, I, V, rank = d["D"], c.mlp_intermediate_size, c.vocab_size, c.gate_low_rank_dim
    norm = "g_norm_swish_gate" if fused_norm_gate(c.to_hf_dict() if raw is None else raw) else "g_norm"
    per_layer = [("attn_norm.weight", ("attn_norm", "weight"), "plain", (D,)),
                 ("attn.q_proj.weight", ("attn", "q_proj", "kernel"), "linear", (d["dk"], D)),
                 ("attn.k_proj.weight", ("attn", "k_proj", "kernel"), "linear", (d["dk_kv"], D)),
                 ("attn.v_proj.weight", ("attn", "v_proj", "kernel"), "linear", (d["dv_kv"], D))]
    if c.use_output_gate:
        per_layer.append(("attn.g_proj.weight", ("attn", "g_proj", "kernel"), "linear", (d["dv"], D)))
    if c.use_short_conv:
        for n, ch in (("q", d["dk"]), ("k", d["dk_kv"]), ("v", d["dv_kv"])):
            per_layer.append((f"attn.{n}_conv1d.weight", ("attn", f"{n}_conv1d", "weight"), "conv",
                              (ch, 1, c.conv_size)))
    per_layer += [("attn.gk_proj.0.weight", ("attn", "gk_proj_0", "kernel"), "linear", (rank, D)),
                  ("attn.gk_proj.1.weight", ("attn", "gk_proj_1", "kernel"), "linear", (d["dk_kv"], rank)),
                  ("attn.gk_proj.1.bias", ("attn", "gk_proj_1", "bias"), "plain", (d["dk_kv"],)),
                  ("attn.o_proj.weight", ("attn", "o_proj", "kernel"), "linear", (D, d["dv"]))]
    if c.elementwise_affine:
        per_layer.append((f"attn.{norm}.weight", ("attn", "g_norm", "weight"), "plain", (d["dv"] // d["H"],)))
    return HFTensor.decoder_layout(c, per_layer, mlp_width=I, vocab=V)


register_family(Family("gla", GLAConfig, GLAForCausalLM, mixer_flops=gla_mixer_flops, hf_layout=gla_hf_layout,
                       presets=paper_presets("gla", heads_340m=4, heads_1_3b=4)))
