"""Model configurations (field names and defaults mirror fla's ``GLAConfig``/``TransformerConfig``) and presets."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

import jax
import jax.numpy as jnp

from gla_jax.layers.mlp import default_intermediate_size

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Keys Hugging Face adds to every config.json; never part of a model's math. (HF's "dtype"/"torch_dtype" is the storage
# dtype of the tensors, not our compute dtype: from_hf drops it, from_dict keeps our own "dtype" field.)
HF_BOILERPLATE = frozenset({
    "model_type", "architectures", "transformers_version", "torch_dtype", "auto_map", "_name_or_path",
    "name_or_path", "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
    "is_encoder_decoder", "tie_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
    "pruned_heads", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "keys_to_ignore_at_inference", "_attn_implementation",
    "_attn_implementation_autoset", "add_cross_attention", "is_decoder", "cross_attention_hidden_size",
    "finetuning_task", "return_dict_in_generate", "output_scores", "output_router_logits",
    "transformers.js_config", "quantization_config",
})
# fla settings that choose kernels or training losses, never the function computed: accepted with any value.
FLA_KERNEL_KEYS = {"fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True,
                   "fuse_linear_cross_entropy": False, "use_l2warp": False}
# Kept for older callers: every key from_dict accepts and drops.
HF_IGNORED_KEYS = HF_BOILERPLATE | frozenset(FLA_KERNEL_KEYS)
# Names in jax.checkpoint_policies that are policies themselves (not factories taking arguments).
REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Fields every family shares (all gla-jax's own, none written to fla/HF files), and the one codec between our
    configs and fla/HF ``config.json`` files.

    ``dtype``: compute dtype ("float32" | "bfloat16" | "float16"); ``param_dtype``: parameter dtype;
    ``scan_layers``: run the stacked layers with ``jax.lax.scan`` (compile time flat in depth) instead of a Python
    loop; ``remat``: rematerialise each layer in the backward pass, saving what ``remat_policy`` (a name in
    ``jax.checkpoint_policies``: REMAT_POLICIES) allows.

    A subclass sets ``model_type``, ``HF_FIELDS`` (its fields that fla/HF also have, with the same defaults),
    ``HF_ARCHITECTURES`` and optionally ``HF_UNSUPPORTED`` ((field, predicate, reason) for values only fla can
    express) and ``hf_export_problem`` (our settings fla cannot express).
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = True

    model_type: typing.ClassVar[str] = ""
    HF_FIELDS: typing.ClassVar[frozenset] = frozenset()
    HF_ARCHITECTURES: typing.ClassVar[tuple] = ()
    HF_UNSUPPORTED: typing.ClassVar[tuple] = ()
    # Settings of the file's library that choose kernels, not the function (fla's; transformers families: {}).
    HF_KERNEL_KEYS: typing.ClassVar[dict] = FLA_KERNEL_KEYS
    # Activation names rewritten on export (fla's GatedMLP accepts only "swish" for SiLU).
    HF_ACT_NAMES: typing.ClassVar[dict] = {"silu": "swish"}

    def _check_common(self):
        if self.hidden_size <= 0 or self.num_hidden_layers <= 0 or self.vocab_size <= 0 or self.num_heads <= 0:
            raise ValueError("hidden_size, num_hidden_layers, num_heads and vocab_size must be positive")
        if self.num_kv_heads is not None and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_kv_heads must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        if self.hidden_act not in ("swish", "silu"):
            raise ValueError(f"hidden_act must be 'swish', got {self.hidden_act!r}")
        self._check_shared()
        if self.attnres_block_size is not None:
            raise ValueError("attnres_block_size: attention residuals (fla attnres) are not supported")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size must be positive, got {self.intermediate_size}")

    def _check_shared(self):
        """Checks the fields of this class (dtypes, remat policy)."""
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"param_dtype must be one of {sorted(DTYPES)}, got {self.param_dtype!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")

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

    @property
    def remat_policy_fn(self):
        """The ``jax.checkpoint`` policy named by ``remat_policy``."""
        return getattr(jax.checkpoint_policies, self.remat_policy)

    # -- our own format ---------------------------------------------------------------------------------------------
    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides):
        """Builds a config from our ``to_dict`` (or an fla/HF dict of this family); HF-only keys are dropped,
        unknown keys raise ValueError naming the key; ``overrides`` replace fields."""
        d = {**dict(d), **overrides}
        mt = d.get("model_type")
        if mt is not None and mt != cls.model_type:
            raise ValueError(f"model_type: expected {cls.model_type!r}, got {mt!r}")
        names = cls._field_names()
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

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # -- fla / Hugging Face config.json ---------------------------------------------------------------------------
    @classmethod
    def hf_defaults(cls) -> dict[str, Any]:
        """fla's defaults for its config fields (ours mirror them) plus its kernel-only switches."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for name in sorted(cls.HF_FIELDS):
            f = fields[name]
            out[name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        return {**out, **cls.HF_KERNEL_KEYS}

    @classmethod
    def from_hf(cls, raw: dict, **overrides):
        """Our config from an fla/HF ``config.json`` dict. Unsupported values raise ValueError naming the key
        (``config.json: key=value: why``); bookkeeping keys of fla/transformers (known or newer) are ignored;
        ``overrides`` set our own fields (e.g. ``dtype``, ``impl``) on top."""
        if not isinstance(raw, dict):
            raise ValueError(f"config.json: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"config.json: model_type {model_type!r} is not {cls.model_type!r}")
        archs = raw.get("architectures") or list(cls.HF_ARCHITECTURES[:1])
        if any(a not in cls.HF_ARCHITECTURES for a in archs):
            raise ValueError(f"config.json: architectures {archs} is not [{cls.HF_ARCHITECTURES[0]!r}]")
        for key, ok, why in cls.HF_UNSUPPORTED:
            if key in raw and not ok(raw[key]):
                raise ValueError(f"config.json: {key}={raw[key]!r}: {why}")
        ours = cls._field_names()
        defaults = cls.hf_defaults()
        kwargs = {}
        for key, value in raw.items():
            if key in HF_BOILERPLATE or key in ("dtype",) or key in cls.HF_KERNEL_KEYS:
                continue
            if key in ours:  # fla's fields, and ours when the file was written by gla-jax
                kwargs[key] = value
            elif key in defaults and value != defaults[key]:
                raise ValueError(f"config.json: {key}={value!r} is not supported by gla_jax's {cls.__name__}")
            # other keys (newer fla/transformers bookkeeping) are ignored
        for key, value in overrides.items():
            if key not in ours:
                raise ValueError(f"{key}: not a {cls.__name__} field (overrides: {sorted(overrides)})")
            kwargs[key] = value
        return cls(**kwargs)

    def hf_export_problem(self) -> str | None:
        """Why fla cannot express this config (a "field=value: reason" line), or None."""
        return None

    def to_hf_dict(self) -> dict[str, Any]:
        """The fla/HF ``config.json`` content: fla's keys only (no gla-jax extras), ``model_type`` and
        ``architectures``; ValueError naming the field when fla cannot express this config."""
        problem = self.hf_export_problem()
        if problem:
            raise ValueError(f"config.{problem}")
        out = self.hf_defaults()
        out.update({k: v for k, v in dataclasses.asdict(self).items() if k in self.HF_FIELDS})
        for key, ok, why in self.HF_UNSUPPORTED:
            if key in out and not ok(out[key]):
                raise ValueError(f"config.{key}={out[key]!r}: {why}")
        if out.get("hidden_act") in self.HF_ACT_NAMES:  # the same function under the name the library accepts
            out["hidden_act"] = self.HF_ACT_NAMES[out["hidden_act"]]
        return {"model_type": self.model_type, "architectures": [self.HF_ARCHITECTURES[0]], **out}


_SHARED_UNSUPPORTED = (
    ("hidden_act", lambda v: v in ("swish", "silu"), "only the swish (SwiGLU) activation is supported"),
    ("attnres_block_size", lambda v: v is None, "attention residuals (attnres) are not supported"),
)


def _field_set(cls) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class FlaDecoderConfig(ModelConfig):
    """The fields fla's decoder configs (``GLAConfig``, ``RetNetConfig``, ``TransformerConfig``) share, with fla's
    defaults (a family overrides a default where fla's differs, e.g. RetNet's ``hidden_ratio``);
    ``max_position_embeddings``, ``use_cache`` and the token ids are kept for round trips but do not change the
    math. A subclass adds ``num_heads`` and its own fields and lists them with :data:`FLA_DECODER_FIELDS` in
    ``HF_FIELDS``."""

    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_kv_heads: int | None = None
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    max_position_embeddings: int = 2048
    elementwise_affine: bool | None = True
    norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    vocab_size: int = 32000
    attnres_block_size: int | None = None

    HF_UNSUPPORTED = _SHARED_UNSUPPORTED


#: The fla config fields every :class:`FlaDecoderConfig` has.
FLA_DECODER_FIELDS = _field_set(FlaDecoderConfig) - _field_set(ModelConfig)


@dataclasses.dataclass(frozen=True)
class FlaLinearAttentionConfig(FlaDecoderConfig):
    """The fields fla's linear-attention configs (``GLAConfig``, ``RetNetConfig``) add, with fla GLA's defaults
    (RetNet overrides ``expand_k``/``expand_v``): key/value widths ``hidden_size · expand_k/v``, the feature map, the
    short convolution, the output gate, and ``attn`` (hybrid softmax-attention layers, which must be None here).
    ``attn_mode`` only picks fla's kernel."""

    attn_mode: str = "chunk"
    expand_k: float = 0.5
    expand_v: float = 1.0
    feature_map: str | None = None
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    attn: dict | None = None

    HF_UNSUPPORTED = _SHARED_UNSUPPORTED + (
        ("attn", lambda v: v is None, "hybrid models with softmax-attention layers are not supported"),)

    def _check_common(self):
        super()._check_common()
        if self.attn is not None:
            raise ValueError("attn: hybrid softmax-attention layers are not supported (set attn to null)")


#: The fla config fields every :class:`FlaLinearAttentionConfig` has.
FLA_LINEAR_ATTENTION_FIELDS = _field_set(FlaLinearAttentionConfig) - _field_set(ModelConfig)


@dataclasses.dataclass(frozen=True)
class GLAConfig(FlaLinearAttentionConfig):
    """GLA language model config. fla's ``GLAConfig`` fields (names and defaults): those of
    :class:`FlaLinearAttentionConfig` plus ``num_heads``, ``clamp_min``, ``use_gk`` and ``use_gv`` (the last two kept
    for round trips: fla's layer ignores them too).

    gla-jax fields: ``gate`` ("gla" | "scalar" | "fixed" | "none", the paper's ablation), ``impl`` (operator backend:
    one of ``gla_jax.ops.registry.choices()``, e.g. "auto", "chunk", "triton"), ``chunk_size``,
    ``gate_logit_normalizer`` and ``gate_low_rank_dim`` (fixed at 16 in fla's models), ``conv_bias``, and the shared
    ``dtype``, ``param_dtype``, ``scan_layers``, ``remat``, ``remat_policy`` (:class:`ModelConfig`).
    """

    model_type = "gla"

    num_heads: int = 4
    clamp_min: float | None = None
    use_gk: bool = True
    use_gv: bool = False
    # gla-jax
    gate: str = "gla"
    impl: str = "auto"
    chunk_size: int = 64
    gate_logit_normalizer: float = 16
    gate_low_rank_dim: int = 16
    conv_bias: bool = False

    HF_FIELDS = FLA_LINEAR_ATTENTION_FIELDS | {"num_heads", "clamp_min", "use_gk", "use_gv"}
    HF_ARCHITECTURES = ("GLAForCausalLM", "GLAModel")

    def hf_export_problem(self):
        if self.gate_low_rank_dim != 16:
            return f"gate_low_rank_dim={self.gate_low_rank_dim}: fla's GLAForCausalLM always uses 16"
        if self.gate_logit_normalizer != 16:
            return f"gate_logit_normalizer={self.gate_logit_normalizer}: fla's GLAForCausalLM always uses 16"
        if self.conv_bias:
            return "conv_bias=True: fla's GLA layer has no short-convolution bias"
        if self.gate != "gla":
            return f"gate={self.gate!r}: fla's GLA layer has only the per-key gate ('gla')"
        return None

    def __post_init__(self):
        self._check_common()
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
class TransformerConfig(FlaDecoderConfig):
    """Transformer++ (LLaMA-style) config. fla's ``TransformerConfig`` fields: those of :class:`FlaDecoderConfig`
    plus ``num_heads``, ``qkv_bias``, ``qk_norm``, ``window_size`` (sliding window: must be None) and ``rope_theta``.
    gla-jax fields: the shared ones (:class:`ModelConfig`) and ``attention_impl`` (``jax.nn.dot_product_attention``
    implementation: None = let JAX choose, "xla", "cudnn")."""

    model_type = "transformer"

    num_heads: int = 32
    qkv_bias: bool = False
    qk_norm: bool = False
    window_size: int | None = None
    rope_theta: float | None = 10000.0
    # gla-jax
    attention_impl: str | None = None

    HF_FIELDS = FLA_DECODER_FIELDS | {"num_heads", "qkv_bias", "qk_norm", "window_size", "rope_theta"}
    HF_ARCHITECTURES = ("TransformerForCausalLM", "TransformerModel")
    HF_UNSUPPORTED = _SHARED_UNSUPPORTED + (
        ("window_size", lambda v: v is None, "sliding-window attention is not supported"),)

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


# Presets live with their families (gla_jax/models/gla.py, transformer.py); these names stay importable from here.
from gla_jax.models.registry import PRESETS, get_config  # noqa: E402

__all__ = ["DTYPES", "FLA_DECODER_FIELDS", "FLA_LINEAR_ATTENTION_FIELDS", "FlaDecoderConfig",
           "FlaLinearAttentionConfig", "GLAConfig", "ModelConfig", "PRESETS", "REMAT_POLICIES", "TransformerConfig", "get_config"]
