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
from gla_jax.models.backbone import CausalLM, RecurrentLayerMixer
from gla_jax.models.mamba_config import MAMBA_FAMILY_FIELDS, MambaFamilyConfig, mamba_hf_layout_frame
from gla_jax.models.registry import Family, HFTensor, register_family


@dataclasses.dataclass(frozen=True)
class MambaConfig(MambaFamilyConfig):
    """Mamba config. transformers' ``MambaConfig`` fields (names and defaults): those of
    :class:`MambaFamilyConfig` plus ``time_step_scale`` and ``time_step_init_scheme`` (they set the from-scratch
    time-step projection, docs/design.md §9.3), ``use_mambapy`` and ``use_associative_scan`` (kernel choices, kept
    for round trips). ``intermediate_size`` is ``expand · hidden_size`` (transformers writes it to config.json
    and recomputes it). gla-jax's own: ``chunk_size`` (steps per chunk of the selective scan, docs/design.md §9.2) and the shared fields of
    :class:`ModelConfig`."""

    model_type = "mamba"

    time_step_scale: float = 1.0
    time_step_init_scheme: str = "random"
    use_mambapy: bool = False
    use_associative_scan: bool = True
    # gla-jax
    chunk_size: int = 64

    HF_FIELDS = MAMBA_FAMILY_FIELDS | {"time_step_scale", "time_step_init_scheme", "use_mambapy",
                                       "use_associative_scan"}
    HF_ARCHITECTURES = ("MambaForCausalLM", "MambaModel")

    def __post_init__(self):
        self._check_mamba("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel",
                          "chunk_size")
        r = self.time_step_rank
        if r != "auto" and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
            raise ValueError(f"time_step_rank: expected 'auto' or a positive int, got {r!r}")

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


class MambaForCausalLM(CausalLM):
    """Mamba language model. ``model(input_ids [B, T] int, *, segment_ids=None) -> logits [B, T, vocab] float32``;
    decoding state per layer ``[B, I, N]`` + conv tail whatever the context length (see :class:`CausalLM`)."""

    config_class = MambaConfig
    mixer_class = MambaLMMixer


MambaBlock = MambaForCausalLM.block_class


def mamba_mixer_flops(c: MambaConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one Mamba layer: the in, x, dt and out projections, the depthwise convolution and
    the selective scan (per channel and state entry: decay, input and output multiply-adds, ~6 FLOPs)."""
    D, I, N, R = c.hidden_size, c.intermediate_size, c.state_size, c.dt_rank
    proj = 2 * (D * 2 * I + I * (R + 2 * N) + R * I + I * D)
    return proj + 2 * c.conv_kernel * I + 6 * I * N


def mamba_hf_layout(c: MambaConfig, raw: dict | None = None) -> dict[str, HFTensor]:
    """transformers ``MambaForCausalLM`` tensor name -> our stacked parameter (see :class:`HFTensor`)."""
    I, N, R = c.intermediate_size, c.state_size, c.dt_rank
    ssm = [("x_proj.weight", ("x_proj", "kernel"), "linear", (R + 2 * N, I)),
           ("dt_proj.weight", ("dt_proj", "kernel"), "linear", (I, R)),
           ("dt_proj.bias", ("dt_proj", "bias"), "plain", (I,)),
           ("A_log", ("A_log",), "plain", (I, N)),
           ("D", ("D",), "plain", (I,))]
    return mamba_hf_layout_frame(c, ssm, in_width=2 * I, conv_dim=I)


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
