"""The RetNet family (multi-scale retention: fixed per-head decays, the paper's RetNet baseline): fla's
``RetNetForCausalLM`` on the shared decoder backbone, registered in one call at the bottom (docs/design.md §4, §9.4).

Blocks are fla's pre-norm ``attn_norm`` / ``attn`` (:class:`gla_jax.layers.retention.MultiScaleRetention` on the
scalar-gate operator) / ``mlp_norm`` / SwiGLU ``mlp``, with fla's tensor names (``model.embeddings``,
``model.layers.{i}.*``, ``model.norm``, ``lm_head``). Decoding keeps, per layer, the state ``[B, H, Dk/H, Dv/H]``
float32 and the rotary position count, whatever the context length.
"""

from __future__ import annotations

import dataclasses

from gla_jax.layers.retention import MultiScaleRetention
from gla_jax.models.backbone import CausalLM, RecurrentLayerMixer
from gla_jax.models.config import FLA_LINEAR_ATTENTION_FIELDS, FlaLinearAttentionConfig
from gla_jax.models.gla import fused_norm_gate
from gla_jax.models.registry import Family, HFTensor, paper_presets, register_family


@dataclasses.dataclass(frozen=True)
class RetNetConfig(FlaLinearAttentionConfig):
    """RetNet config. fla's ``RetNetConfig`` fields (names and defaults): those of
    :class:`FlaLinearAttentionConfig` (with RetNet's ``expand_k`` 1, ``expand_v`` 2, ``hidden_ratio`` 2) plus
    ``num_heads``. fla's ``RetNetBlock`` never passes ``use_short_conv``/``conv_size`` to its retention layer, so they
    are kept for round trips and build no convolution here either. ``hidden_act`` is both the MLP activation and the
    output gate's function (fla's ``gate_fn``). gla-jax fields: ``chunk_size`` (operator chunk length) and the shared
    ones (:class:`ModelConfig`)."""

    model_type = "retnet"

    expand_k: float = 1.0
    expand_v: float = 2.0
    hidden_ratio: int | None = 2
    num_heads: int = 8
    # gla-jax
    chunk_size: int = 64

    HF_FIELDS = FLA_LINEAR_ATTENTION_FIELDS | {"num_heads"}
    HF_ARCHITECTURES = ("RetNetForCausalLM", "RetNetModel")

    def __post_init__(self):
        self._check_common()
        if self.attn_mode not in ("chunk", "fused_chunk", "parallel", "fused_recurrent"):
            raise ValueError(f"attn_mode must be 'chunk', 'fused_chunk', 'parallel' or 'fused_recurrent', got "
                             f"{self.attn_mode!r}")
        if (not isinstance(self.chunk_size, int) or self.chunk_size < 16
                or self.chunk_size & (self.chunk_size - 1)):
            raise ValueError(f"chunk_size: expected a power of two >= 16, got {self.chunk_size!r}")
        # the layer's own checks (widths divisible by the heads, even head key dim, feature map) name the field
        from gla_jax.layers.linear_attention import exact_dim
        from gla_jax.layers.retention import FEATURE_MAPS

        if self.feature_map is not None and self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected None or one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        for name in ("expand_k", "expand_v"):
            dim = exact_dim(self.hidden_size, getattr(self, name), name)
            if dim % self.num_heads:
                raise ValueError(f"{name}: hidden_size * {name} = {dim} must be divisible by num_heads="
                                 f"{self.num_heads}")
        if (self.key_dim // self.num_heads) % 2:
            raise ValueError(f"expand_k: the head key dim must be even for the rotary embedding, got "
                             f"{self.key_dim // self.num_heads}")

    @property
    def key_dim(self) -> int:
        return int(round(self.hidden_size * self.expand_k))

    @property
    def value_dim(self) -> int:
        return int(round(self.hidden_size * self.expand_v))


class RetentionMixer(RecurrentLayerMixer, MultiScaleRetention):
    """MultiScaleRetention as a backbone mixer: a fixed-size decoding state (``max_len`` is ignored); one-token
    calls with a cache take the recurrent step. Cache per layer: {'recurrent': [B, H, K, V] float32, 'conv': None, 'offset': [B] int32}."""

    @classmethod
    def from_config(cls, c: RetNetConfig, *, rngs):
        return cls(c.hidden_size, expand_k=c.expand_k, expand_v=c.expand_v, num_heads=c.num_heads,
                   num_kv_heads=c.num_kv_heads, feature_map=c.feature_map, use_short_conv=False,
                   use_output_gate=c.use_output_gate, gate_fn=c.hidden_act,
                   elementwise_affine=bool(c.elementwise_affine), norm_eps=c.norm_eps, chunk_size=c.chunk_size,
                   initializer_range=c.initializer_range, dtype=c.compute_dtype, param_dtype=c.params_dtype,
                   rngs=rngs)


class RetNetForCausalLM(CausalLM):
    """RetNet language model. ``model(input_ids [B, T] int, *, segment_ids=None) -> logits [B, T, vocab] float32``;
    decoding state per layer ``[B, H, Dk/H, Dv/H]`` whatever the context length (see :class:`CausalLM`)."""

    config_class = RetNetConfig
    mixer_class = RetentionMixer


RetNetBlock = RetNetForCausalLM.block_class


def retnet_mixer_flops(c: RetNetConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one retention layer: q, k, v, output-gate and output projections and the
    scalar-decay chunk form (per head: ``q kᵀ`` and ``(P ⊙ D) v`` over on average C/2 keys, state read and write
    ``4 K V``)."""
    D, H, Dk, Dv = c.hidden_size, c.num_heads, c.key_dim, c.value_dim
    G = H // (c.num_kv_heads or H)
    proj = 2 * D * (Dk + Dk // G + Dv // G) + 2 * Dv * D
    if c.use_output_gate:
        proj += 2 * D * Dv
    K, V = Dk // H, Dv // H
    chunk = min(c.chunk_size, max(int(seq_len), 1))
    return proj + H * (4 * K * V + 2 * (chunk / 2) * (K + V))


def retnet_hf_layout(c: RetNetConfig, raw: dict | None = None) -> dict[str, HFTensor]:
    """fla ``RetNetForCausalLM`` tensor name -> our stacked parameter (see :class:`HFTensor`). ``raw`` (the
    config.json read) picks the output norm's name, ``g_norm_swish_gate`` or ``g_norm`` (fla's fused norm+gate)."""
    D, H, Dk, Dv = c.hidden_size, c.num_heads, c.key_dim, c.value_dim
    G = H // (c.num_kv_heads or H)
    norm = "g_norm_swish_gate" if fused_norm_gate(c.to_hf_dict() if raw is None else raw) else "g_norm"
    rows = [("attn_norm.weight", ("attn_norm", "weight"), "plain", (D,)),
            ("attn.q_proj.weight", ("attn", "q_proj", "kernel"), "linear", (Dk, D)),
            ("attn.k_proj.weight", ("attn", "k_proj", "kernel"), "linear", (Dk // G, D)),
            ("attn.v_proj.weight", ("attn", "v_proj", "kernel"), "linear", (Dv // G, D))]
    if c.use_output_gate:
        rows.append(("attn.g_proj.weight", ("attn", "g_proj", "kernel"), "linear", (Dv, D)))
    rows.append(("attn.o_proj.weight", ("attn", "o_proj", "kernel"), "linear", (D, Dv)))
    if c.elementwise_affine:
        rows.append((f"attn.{norm}.weight", ("attn", "g_norm", "weight"), "plain", (Dv // H,)))
    return HFTensor.decoder_layout(c, rows, mlp_width=c.mlp_intermediate_size, vocab=c.vocab_size)


# Paper scale: GLA-paper-sized RetNet (24 layers, expand_k 1, expand_v 2, SwiGLU hidden_ratio 2: fla's RetNet
# defaults) with the 32,000-token vocabulary. Parameters (tests/test_baseline_families.py checks these):
#   retnet-340m: 347,403,264 (tied)     retnet-1.3b: 1,351,727,104 (untied)
register_family(Family("retnet", RetNetConfig, RetNetForCausalLM, mixer_flops=retnet_mixer_flops,
                       hf_layout=retnet_hf_layout, presets=paper_presets("retnet", heads_340m=4, heads_1_3b=8)))

__all__ = ["RetNetBlock", "RetNetConfig", "RetNetForCausalLM", "RetentionMixer", "retnet_hf_layout",
           "retnet_mixer_flops"]
