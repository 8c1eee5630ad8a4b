"""Model configurations (field names and defaults mirror fla's ``GLAConfig``/``TransformerConfig``) and presets."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp

from gla_jax.layers.mlp import default_intermediate_size

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Keys that HF/fla write into config.json but that do not change the model's math: accepted and dropped.
HF_IGNORED_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "model_type", "auto_map", "_name_or_path",
    "fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "is_encoder_decoder",
    "tie_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "pruned_heads",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "keys_to_ignore_at_inference", "_attn_implementation",
    "_attn_implementation_autoset", "add_cross_attention", "is_decoder", "cross_attention_hidden_size",
    "finetuning_task", "return_dict_in_generate", "output_scores", "output_router_logits",
    "transformers.js_config",
})


class _ConfigBase:
    model_type = ""

    def _check_common(self):
        if self.hidden_size <= 0 or self.num_hidden_layers <= 0 or self.vocab_size <= 0 or self.num_heads <= 0:
            raise ValueError("hidden_size, num_hidden_layers, num_heads and vocab_size must be positive")
        if self.num_kv_heads is not None and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_kv_heads must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        if self.hidden_act not in ("swish", "silu"):
            raise ValueError(f"hidden_act must be 'swish', got {self.hidden_act!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"param_dtype must be one of {sorted(DTYPES)}, got {self.param_dtype!r}")
        if self.attnres_block_size is not None:
            raise ValueError("attnres_block_size: attention residuals (fla attnres) are not supported")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size must be positive, got {self.intermediate_size}")

    @property
    def mlp_intermediate_size(self) -> int:
        """The SwiGLU width: ``intermediate_size`` or fla's default from ``hidden_ratio``."""
        if self.intermediate_size is not None:
            return int(self.intermediate_size)
        return default_intermediate_size(self.hidden_size, self.hidden_ratio)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides):
        """Builds a config from an fla/HF ``config.json`` dict (or our own ``to_dict``); HF-only keys are dropped,
        unknown keys raise ValueError naming the key; ``overrides`` replace fields."""
        d = {**dict(d), **overrides}
        mt = d.get("model_type")
        if mt is not None and mt != cls.model_type:
            raise ValueError(f"model_type: expected {cls.model_type!r}, got {mt!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in names:
                kwargs[key] = value
            elif key in HF_IGNORED_KEYS:
                continue
            else:
                raise ValueError(f"{cls.__name__}: unknown config key {key!r}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path, **overrides):
        with open(path) as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """All fields (ours included) plus ``model_type``; ``from_dict`` inverts it."""
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    def to_hf_dict(self) -> dict[str, Any]:
        """The fla/HF ``config.json`` content: fla's keys only (no gla-jax extras) plus ``model_type``."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k in self.HF_FIELDS}
        return {"model_type": self.model_type, **d, "fuse_norm": True, "fuse_swiglu": True,
                "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False, "use_l2warp": False}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class GLAConfig(_ConfigBase):
    """GLA language model config. Fields up to ``attnres_block_size`` mirror fla's ``GLAConfig`` (names and
    defaults); ``attn_mode``, ``use_gk``, ``use_gv``, ``max_position_embeddings``, ``use_cache`` and the token ids are
    kept for round trips but do not change the math (fla's layer ignores use_gk/use_gv too).

    gla-jax fields: ``gate`` ("gla" | "scalar" | "fixed" | "none", the paper's ablation), ``impl`` (operator backend:
    one of ``gla_jax.ops.registry.choices()``, e.g. "auto", "chunk", "triton"), ``chunk_size``,
    ``gate_logit_normalizer`` and ``gate_low_rank_dim`` (fixed at 16 in fla's models), ``conv_bias``, ``dtype``
    (compute: "float32" | "bfloat16"), ``param_dtype`` ("float32"), ``remat`` (rematerialise each block in the backward
    pass).
    """

    model_type = "gla"

    hidden_size: int = 2048
    expand_k: float = 0.5
    expand_v: float = 1.0
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None
    num_hidden_layers: int = 24
    num_heads: int = 4
    num_kv_heads: int | None = None
    feature_map: str | None = None
    attn_mode: str = "chunk"
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    clamp_min: float | None = None
    hidden_act: str = "swish"
    max_position_embeddings: int = 2048
    elementwise_affine: bool | None = True
    norm_eps: float = 1e-6
    use_gk: bool = True
    use_gv: bool = False
    attn: dict | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    vocab_size: int = 32000
    attnres_block_size: int | None = None
    # gla-jax
    gate: str = "gla"
    impl: str = "auto"
    chunk_size: int = 64
    gate_logit_normalizer: float = 16
    gate_low_rank_dim: int = 16
    conv_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    HF_FIELDS = frozenset({
        "hidden_size", "expand_k", "expand_v", "hidden_ratio", "intermediate_size", "num_hidden_layers",
        "num_heads", "num_kv_heads", "feature_map", "attn_mode", "use_short_conv", "conv_size", "use_output_gate",
        "clamp_min", "hidden_act", "max_position_embeddings", "elementwise_affine", "norm_eps", "use_gk", "use_gv",
        "attn", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
        "initializer_range", "vocab_size", "attnres_block_size"})

    def __post_init__(self):
        self._check_common()
        if self.attn is not None:
            raise ValueError("attn: hybrid softmax-attention layers are not supported (set attn to null)")
        from gla_jax.layers.gla import GATES
        from gla_jax.ops import registry

        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        registry.check_impl(self.impl)
        if self.attn_mode not in ("chunk", "fused_recurrent", "fused_chunk"):
            raise ValueError(f"attn_mode must be 'chunk', 'fused_recurrent' or 'fused_chunk', got {self.attn_mode!r}")
        H = self.num_heads
        for name, e in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            dim = self.hidden_size * e
            if not math.isclose(dim, round(dim)) or round(dim) % H:
                raise ValueError(f"{name}: hidden_size * {name} = {dim} must be an integer divisible by "
                                 f"num_heads={H}")
        if self.conv_size < 1:
            raise ValueError(f"conv_size must be >= 1, got {self.conv_size}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(_ConfigBase):
    """Transformer++ (LLaMA-style) config; fields up to ``attnres_block_size`` mirror fla's ``TransformerConfig``.
    ``window_size`` (sliding window) must be None. gla-jax fields: ``dtype``, ``param_dtype``, ``remat``,
    ``attention_impl`` (``jax.nn.dot_product_attention`` implementation: None = let JAX choose, "xla", "cudnn")."""

    model_type = "transformer"

    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_heads: int = 32
    num_kv_heads: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    window_size: int | None = None
    rope_theta: float | None = 10000.0
    max_position_embeddings: int = 2048
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    initializer_range: float = 0.02
    elementwise_affine: bool | None = True
    norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    vocab_size: int = 32000
    attnres_block_size: int | None = None
    # gla-jax
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    attention_impl: str | None = None

    HF_FIELDS = frozenset({
        "hidden_size", "num_hidden_layers", "num_heads", "num_kv_heads", "qkv_bias", "qk_norm", "window_size",
        "rope_theta", "max_position_embeddings", "hidden_ratio", "intermediate_size", "hidden_act",
        "initializer_range", "elementwise_affine", "norm_eps", "use_cache", "pad_token_id", "bos_token_id",
        "eos_token_id", "tie_word_embeddings", "vocab_size", "attnres_block_size"})

    def __post_init__(self):
        self._check_common()
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size} into even "
                             "head dims")
        if self.window_size is not None:
            raise ValueError("window_size: sliding-window attention is not supported (use null)")
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ValueError(f"attention_impl must be None, 'xla' or 'cudnn', got {self.attention_impl!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Presets: the paper's sizes (DESIGN §3) and small CPU models. Small ones use a 320-token vocabulary (the byte
# tokenizer's 257 ids, padded to a multiple of 64);
# override with get_config(name, vocab_size=...).
PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "gla-340m": (GLAConfig, dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, vocab_size=32000,
                                 tie_word_embeddings=True)),
    "gla-1.3b": (GLAConfig, dict(hidden_size=2048, num_hidden_layers=24, num_heads=4, vocab_size=32000,
                                 tie_word_embeddings=False)),
    "transformer-340m": (TransformerConfig, dict(hidden_size=1024, num_hidden_layers=24, num_heads=16,
                                                 vocab_size=32000, tie_word_embeddings=True)),
    "transformer-1.3b": (TransformerConfig, dict(hidden_size=2048, num_hidden_layers=24, num_heads=32,
                                                 vocab_size=32000, tie_word_embeddings=False)),
    "gla-tiny": (GLAConfig, dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=320,
                                 tie_word_embeddings=True)),
    "gla-small": (GLAConfig, dict(hidden_size=256, num_hidden_layers=4, num_heads=4, vocab_size=320,
                                  tie_word_embeddings=True)),
    "transformer-tiny": (TransformerConfig, dict(hidden_size=64, num_hidden_layers=2, num_heads=2,
                                                 vocab_size=320, tie_word_embeddings=True)),
    "transformer-small": (TransformerConfig, dict(hidden_size=256, num_hidden_layers=4, num_heads=4,
                                                  vocab_size=320, tie_word_embeddings=True)),
}


def get_config(name: str, **overrides):
    """The preset ``name`` (see ``PRESETS``) as a GLAConfig/TransformerConfig, with field ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"name: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    cls, fields = PRESETS[name]
    names = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
        if key not in names:
            raise ValueError(f"{cls.__name__}: unknown config key {key!r}")
    return cls(**{**fields, **overrides})
