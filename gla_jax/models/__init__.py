"""Flax NNX language models: model families (GLA, Transformer++, Mamba2, Mamba, RetNet) on one decoder backbone,
their configs, presets and registry (docs/design.md §4).

    from gla_jax.models import build_model, get_config
    model = build_model(get_config("gla-tiny"), rngs=nnx.Rngs(0))    # or GLAForCausalLM(config, rngs=...)
    logits = model(input_ids, segment_ids=None)          # [B, T] int32 -> [B, T, vocab] float32

Mixed precision: parameters in ``config.param_dtype`` (float32), computation in ``config.dtype`` (float32 or
bfloat16), GLA state and norms in float32, logits float32.

Logical axis names. Every parameter is an ``nnx.Param`` whose metadata ``out_sharding`` holds logical names, so
``nnx.get_partition_spec(nnx.state(model))`` returns them (parameters are never sharded eagerly at creation). The
layers' parameters are stacked: they carry a leading ``[L]`` axis named ``layers`` (never sharded):

==========================  =====================================  ==========================
parameter                   shape (kernels are [in, out])          logical names
==========================  =====================================  ==========================
embeddings.embedding        [vocab, D]                             (vocab, embed)
lm_head.kernel              [D, vocab]                             (embed, vocab)
layers.*.q_proj / g_proj    [L, D, H·Dk]  / [L, D, H·Dv]           (layers, embed, heads)
layers.*.k_proj / v_proj    [L, D, Hkv·Dk] / [L, D, Hkv·Dv]        (layers, embed, kv)
layers.*.o_proj kernel      [L, H·Dv, D]                           (layers, heads, embed)
layers.*.gk_proj_0 kernel   [L, D, 16]                             (layers, embed, None)
layers.*.gk_proj_1 k / b    [L, 16, Hkv·Dk] / [L, Hkv·Dk]          (layers, None, kv) / (layers, kv)
layers.*.q_conv1d.weight    [L, H·Dk, W]                           (layers, heads, None)
layers.*.k/v_conv1d.weight  [L, Hkv·D*, W]                         (layers, kv, None)
layers.mlp.gate/up_proj     [L, D, I]                              (layers, embed, mlp)
layers.mlp.down_proj        [L, I, D]                              (layers, mlp, embed)
RMSNorm .weight             [D] / [L, D] / [L, head dim]           (None,) / (layers, None)
Transformer q_proj / o_proj [L, D, D]                              (layers, embed, heads) / (layers, heads, embed)
Transformer k/v_proj        [L, D, Hkv·Dh]                         (layers, embed, kv)
==========================  =====================================  ==========================

Biases carry the output-side name. Activations between blocks are constrained to (batch, seq, embed) with
``gla_jax.layers.sharding.constrain``, a no-op unless a mesh (``jax.set_mesh``) and logical rules
(``nnx.logical_axis_rules``) are both active; names missing from the rules map to None (replicated).
"""

from gla_jax.models.config import GLAConfig, ModelConfig, TransformerConfig
from gla_jax.models.registry import (PRESETS, Family, build_model, config_from_dict, families, family_for_hf,
                                     family_of, get_config, get_family, register_family, resolve_config,
                                     unregister_family)
from gla_jax.models.backbone import CausalLM, DecoderBlock, DecoderModel, MixContext
from gla_jax.models.gla import GLABlock, GLAForCausalLM, GLAMixer
from gla_jax.models.transformer import AttentionMixer, TransformerBlock, TransformerForCausalLM
from gla_jax.models.mamba2 import Mamba2Config, Mamba2ForCausalLM
from gla_jax.models.mamba import MambaConfig, MambaForCausalLM
from gla_jax.models.retnet import RetNetConfig, RetNetForCausalLM

__all__ = ["PRESETS", "AttentionMixer", "CausalLM", "DecoderBlock", "DecoderModel", "Family", "GLABlock", "GLAConfig",
           "GLAForCausalLM", "GLAMixer", "Mamba2Config", "Mamba2ForCausalLM", "MambaConfig", "MambaForCausalLM", "RetNetConfig", "RetNetForCausalLM", "MixContext", "ModelConfig", "TransformerBlock", "TransformerConfig",
           "TransformerForCausalLM", "build_model", "config_from_dict", "families", "family_for_hf", "family_of",
           "get_config", "get_family", "register_family", "resolve_config", "unregister_family"]
