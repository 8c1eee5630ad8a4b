"""Flax NNX language models: GLA and the Transformer++ baseline, their configs and presets.

    from gla_jax.models import GLAConfig, GLAForCausalLM, get_config
    model = GLAForCausalLM(get_config("gla-tiny"), rngs=nnx.Rngs(0))
    logits = model(input_ids, segment_ids=None)          # [B, T] int32 -> [B, T, vocab] float32

Mixed precision: parameters in ``config.param_dtype`` (float32), computation in ``config.dtype`` (float32 or
bfloat16), GLA state and norms in float32, logits float32.

Logical axis names. Every parameter is an ``nnx.Param`` whose metadata ``out_sharding`` holds logical names, so
``nnx.get_partition_spec(nnx.state(model))`` returns them (parameters are never sharded eagerly at creation):

==========================  =====================================  ==========================
parameter                   shape (kernels are [in, out])          logical names
==========================  =====================================  ==========================
embeddings.embedding        [vocab, D]                             (vocab, embed)
lm_head.kernel              [D, vocab]                             (embed, vocab)
*.q_proj / g_proj kernel    [D, H·Dk]  / [D, H·Dv]                 (embed, heads)
*.k_proj / v_proj kernel    [D, Hkv·Dk] / [D, Hkv·Dv]              (embed, kv)
*.o_proj kernel             [H·Dv, D]                              (heads, embed)
*.gk_proj_0 kernel          [D, 16]                                (embed, None)
*.gk_proj_1 kernel / bias   [16, Hkv·Dk] / [Hkv·Dk]                (None, kv) / (kv,)
*.q_conv1d.weight           [H·Dk, W]                              (heads, None)
*.k_conv1d/v_conv1d.weight  [Hkv·D*, W]                            (kv, None)
*.mlp.gate_proj / up_proj   [D, I]                                 (embed, mlp)
*.mlp.down_proj             [I, D]                                 (mlp, embed)
RMSNorm .weight             [D] or [head dim]                      (None,)
Transformer q_proj / o_proj [D, D]                                 (embed, heads) / (heads, embed)
Transformer k/v_proj        [D, Hkv·Dh]                            (embed, kv)
==========================  =====================================  ==========================

Biases carry the output-side name. Activations between blocks are constrained to (batch, seq, embed) with
``gla_jax.layers.sharding.constrain``, a no-op unless a mesh (``jax.set_mesh``) and logical rules
(``nnx.logical_axis_rules``) are both active; names missing from the rules map to None (replicated).
"""

from gla_jax.models.config import PRESETS, GLAConfig, TransformerConfig, get_config
from gla_jax.models.gla import GLABlock, GLAForCausalLM, GLAModel
from gla_jax.models.transformer import TransformerBlock, TransformerForCausalLM, TransformerModel

__all__ = ["PRESETS", "GLABlock", "GLAConfig", "GLAForCausalLM", "GLAModel", "TransformerBlock", "TransformerConfig",
           "TransformerForCausalLM", "TransformerModel", "build_model", "get_config"]


def build_model(config, *, rngs):
    """GLAForCausalLM or TransformerForCausalLM for ``config``."""
    if isinstance(config, GLAConfig):
        return GLAForCausalLM(config, rngs=rngs)
    if isinstance(config, TransformerConfig):
        return TransformerForCausalLM(config, rngs=rngs)
    raise ValueError(f"config must be a GLAConfig or TransformerConfig, got {type(config).__name__}")
