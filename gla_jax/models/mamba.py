"""The Mamba (v1, selective SSM) family: transformers' ``MambaForCausalLM`` on the shared decoder backbone,
registered in one call at the bottom (docs/design.md §4, §9.4).

A Mamba block is ``x += mixer(norm(x))`` with no MLP (the config's ``mlp_intermediate_size`` is 0), the mixer is
:class:`gla_jax.layers.mamba.MambaMixer` (the chunked selective scan), the final norm is transformers' ``norm_f``.
Checkpoints use transformers' names (``backbone.embeddings``, ``backbone.layers.{i}.norm`` / ``.mixer.*``,
``backbone.norm_f``, ``lm_head`` when untied). Decoding keeps, per layer, the SSM state ``[B, I, N]`` float32 and
the convolution tail ``[B, W-1, I]``, whatever the context length.
"""

from __future__ import annotations

import dataclasses
import math

from gla_jax.layers.mamba import MambaMixer
from gla_jax.models.backbone import CausalLM, DecoderBlock, RecurrentLayerMixer
from gla_jax.models.config import ModelConfig
from gla_jax.models.registry import Family, HFTensor, register_family


@dataclasses.dataclass(frozen=True)
class MambaConfig(ModelConfig):
    """Mamba config. Fields up to ``tie_word_embeddings`` mirror transformers' ``MambaConfig`` (names and
    defaults); ``time_step_scale/min/max/init_scheme/floor`` set the from-scratch time-step projection;
    ``rescale_prenorm_residual``, ``residual_in_fp32``, ``use_mambapy``, ``use_associative_scan``, ``use_cache``
    and the token ids only choose PyTorch's initialisation, kernels or bookkeeping and are kept for round trips (the
    residual stream is in the compute dtype here).
    ``intermediate_size`` is ``expand · hidden_size`` (transformers writes it to config.json and recomputes it).
    gla-jax's own: ``chunk_size`` (steps per chunk of the selective scan, docs/design.md §9.2) and the shared
    fields of :class:`ModelConfig`."""

    model_type = "mamba"

    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 32
    layer_norm_epsilon: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    expand: int = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    residual_in_fp32: bool = True
    time_step_rank: int | str = "auto"
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4
    rescale_prenorm_residual: bool = False
    use_cache: bool = True
    use_mambapy: bool = False
    use_associative_scan: bool = True
    tie_word_embeddings: bool = True
    # gla-jax
    chunk_size: int = 64

    HF_FIELDS = frozenset({
        "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon", "pad_token_id",
        "bos_token_id", "eos_token_id", "expand", "conv_kernel", "use_bias", "use_conv_bias", "hidden_act",
        "initializer_range", "residual_in_fp32", "time_step_rank", "time_step_scale", "time_step_min",
        "time_step_max", "time_step_init_scheme", "time_step_floor", "rescale_prenorm_residual", "use_cache",
        "use_mambapy", "use_associative_scan", "tie_word_embeddings"})
    HF_ARCHITECTURES = ("MambaForCausalLM", "MambaModel")
    HF_UNSUPPORTED = (("hidden_act", lambda v: v in ("silu", "swish"), "only the silu activation is supported"),)
    HF_KERNEL_KEYS = {}
    HF_ACT_NAMES = {}

    def __post_init__(self):
        self._check_shared()
        for name in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel",
                     "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        r = self.time_step_rank
        if r != "auto" and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
            raise ValueError(f"time_step_rank: expected 'auto' or a positive int, got {r!r}")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act: only 'silu' is supported, got {self.hidden_act!r}")

    @classmethod
    def from_hf(cls, raw: dict, **overrides):
        """As :meth:`ModelConfig.from_hf`; ``intermediate_size`` must be ``expand · hidden_size`` (transformers
        recomputes it)."""
        config = super().from_hf({k: v for k, v in raw.items() if k != "intermediate_size"}, **overrides)
        if "intermediate_size" in raw and raw["intermediate_size"] != config.intermediate_size:
            raise ValueError(f"config.json: intermediate_size={raw['intermediate_size']!r} is not expand * hidden_size "
                             f"= {config.intermediate_size}")
        return config

    @property
    def norm_eps(self) -> float:
        """The backbone's RMSNorm epsilon (transformers' ``layer_norm_epsilon``)."""
        return self.layer_norm_epsilon

    @property
    def mlp_intermediate_size(self) -> int:
        """0: Mamba blocks have no MLP."""
        return 0

    @property
    def intermediate_size(self) -> int:
        """The mixer's inner width ``expand · hidden_size``."""
        return self.expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        """The time-step projection rank: ``time_step_rank`` or ceil(hidden_size / 16) for "auto"."""
        return math.ceil(self.hidden_size / 16) if self.time_step_rank == "auto" else int(self.time_step_rank)


class MambaLMMixer(RecurrentLayerMixer, MambaMixer):
    """MambaMixer as a backbone mixer: a fixed-size decoding state (``max_len`` is ignored); one-token calls with a
    cache take the recurrent step. Cache per layer: {'ssm': [B, I, N] float32, 'conv': [B, W-1, I]}."""

    @classmethod
    def from_config(cls, c: MambaConfig, *, rngs):
        return cls(c.hidden_size, state_size=c.state_size, expand=c.expand, conv_kernel=c.conv_kernel,
                   time_step_rank=c.dt_rank, use_conv_bias=c.use_conv_bias, use_bias=c.use_bias,
                   hidden_act=c.hidden_act, time_step_min=c.time_step_min, time_step_max=c.time_step_max,
                   time_step_floor=c.time_step_floor, time_step_scale=c.time_step_scale,
                   time_step_init_scheme=c.time_step_init_scheme, chunk_size=c.chunk_size,
                   initializer_range=c.initializer_range,
                   dtype=c.compute_dtype, param_dtype=c.params_dtype, rngs=rngs)


class MambaBlock(DecoderBlock):
    mixer_class = MambaLMMixer


class MambaForCausalLM(CausalLM):
    """Mamba language model. ``model(input_ids [B, T] int, *, segment_ids=None) -> logits [B, T, vocab] float32``;
    decoding state per layer ``[B, I, N]`` + conv tail whatever the context length (see :class:`CausalLM`)."""

    config_class = MambaConfig
    block_class = MambaBlock


def mamba_mixer_flops(c: MambaConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one Mamba layer: the in, x, dt and out projections, the depthwise convolution and
    the selective scan (per channel and state entry: decay, input and output multiply-adds, ~6 FLOPs)."""
    D, I, N, R = c.hidden_size, c.intermediate_size, c.state_size, c.dt_rank
    proj = 2 * (D * 2 * I + I * (R + 2 * N) + R * I + I * D)
    return proj + 2 * c.conv_kernel * I + 6 * I * N


def mamba_hf_layout(c: MambaConfig, raw: dict | None = None) -> dict[str, HFTensor]:
    """transformers ``MambaForCausalLM`` tensor name -> our stacked parameter (see :class:`HFTensor`)."""
    D, I, N, R = c.hidden_size, c.intermediate_size, c.state_size, c.dt_rank
    rows = [("in_proj.weight", ("in_proj", "kernel"), "linear", (2 * I, D)),
            ("conv1d.weight", ("conv1d", "weight"), "conv", (I, 1, c.conv_kernel)),
            ("x_proj.weight", ("x_proj", "kernel"), "linear", (R + 2 * N, I)),
            ("dt_proj.weight", ("dt_proj", "kernel"), "linear", (I, R)),
            ("dt_proj.bias", ("dt_proj", "bias"), "plain", (I,)),
            ("A_log", ("A_log",), "plain", (I, N)),
            ("D", ("D",), "plain", (I,)),
            ("out_proj.weight", ("out_proj", "kernel"), "linear", (D, I))]
    if c.use_bias:
        rows += [("in_proj.bias", ("in_proj", "bias"), "plain", (2 * I,)),
                 ("out_proj.bias", ("out_proj", "bias"), "plain", (D,))]
    if c.use_conv_bias:
        rows.append(("conv1d.bias", ("conv1d", "bias"), "plain", (I,)))
    return HFTensor.backbone_layout(c, rows, vocab=c.vocab_size)


# Paper scale: the Mamba paper's 370M / 1.3B shapes (48 blocks: no MLP, twice GLA's depth; state 16, expand 2)
# with the 32,000-token vocabulary. Parameters (tests/test_baseline_families.py checks these):
#   mamba-340m: 352,797,696 (tied)     mamba-1.3b: 1,400,276,992 (untied)
register_family(Family("mamba", MambaConfig, MambaForCausalLM, mixer_flops=mamba_mixer_flops,
                       hf_layout=mamba_hf_layout, presets={
    "mamba-340m": dict(hidden_size=1024, num_hidden_layers=48, state_size=16, vocab_size=32000,
                       tie_word_embeddings=True, initializer_range=0.02),
    "mamba-1.3b": dict(hidden_size=2048, num_hidden_layers=48, state_size=16, vocab_size=32000,
                       tie_word_embeddings=False, initializer_range=0.02),
    # small CPU models (byte tokenizer ids padded to 320)
    "mamba-tiny": dict(hidden_size=64, num_hidden_layers=4, state_size=16, vocab_size=320, tie_word_embeddings=True,
                       initializer_range=0.02),
    "mamba-small": dict(hidden_size=256, num_hidden_layers=8, state_size=16, vocab_size=320,
                        tie_word_embeddings=True, initializer_range=0.02),
}))

__all__ = ["MambaBlock", "MambaConfig", "MambaForCausalLM", "MambaLMMixer", "mamba_hf_layout", "mamba_mixer_flops"]
