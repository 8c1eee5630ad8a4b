"""The Mamba2 family (SSD, the data-dependent scalar gate): transformers' ``Mamba2ForCausalLM`` on the shared decoder
backbone, registered in one call at the bottom (docs/design.md §4, §9.4).

A Mamba2 block is ``x += mixer(norm(x))`` with no MLP (the config's ``mlp_intermediate_size`` is 0), the mixer is
:class:`gla_jax.layers.mamba2.Mamba2Mixer` (the scalar-gate operator ``gla_scalar``), the final norm is transformers'
``norm_f``. Checkpoints use transformers' names (``backbone.embeddings``, ``backbone.layers.{i}.norm`` /
``.mixer.*``, ``backbone.norm_f``, ``lm_head``). Decoding keeps, per layer, the SSM state ``[B, H, N, P]`` float32
and the convolution tail ``[B, W-1, I + 2GN]``, whatever the context length.
"""

from __future__ import annotations

import dataclasses

from gla_jax.layers.mamba2 import Mamba2Mixer
from gla_jax.models.backbone import CausalLM, RecurrentLayerMixer
from gla_jax.models.mamba_config import MAMBA_FAMILY_FIELDS, MambaFamilyConfig, mamba_hf_layout_frame
from gla_jax.models.registry import Family, HFTensor, register_family


def _json_float(value) -> float | None:
    """A number from config.json: a float, or transformers' encoding of a non-finite one ``{"__float__":
    "Infinity"}``; None when it is neither."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class Mamba2Config(MambaFamilyConfig):
    """Mamba2 config. transformers' ``Mamba2Config`` fields (names and defaults): those of
    :class:`MambaFamilyConfig` (with Mamba2's sizes, token ids and untied head) plus ``num_heads``, ``head_dim``,
    ``n_groups``, ``time_step_limit`` and ``chunk_size``, the SSD chunk length (a speed setting in both libraries;
    the operator uses :attr:`scan_chunk_size`). ``intermediate_size`` is ``expand · hidden_size`` (= ``num_heads ·
    head_dim``). gla-jax's own: the shared fields of :class:`ModelConfig`."""

    model_type = "mamba2"

    vocab_size: int = 32768
    hidden_size: int = 4096
    state_size: int = 128
    num_hidden_layers: int = 64
    pad_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    num_heads: int = 128
    head_dim: int = 64
    n_groups: int = 8
    time_step_limit: tuple = (0.0, float("inf"))
    chunk_size: int = 256

    HF_FIELDS = MAMBA_FAMILY_FIELDS | {"num_heads", "head_dim", "n_groups", "time_step_limit", "chunk_size"}
    HF_ARCHITECTURES = ("Mamba2ForCausalLM", "Mamba2Model")

    def __post_init__(self):
        self._check_mamba("num_heads", "head_dim", "vocab_size", "hidden_size", "state_size", "num_hidden_layers",
                          "expand", "conv_kernel", "n_groups", "chunk_size")
        if self.num_heads * self.head_dim != self.expand * self.hidden_size:
            raise ValueError(f"num_heads * head_dim: must equal expand * hidden_size = {self.expand * self.hidden_size}"
                             f", got {self.num_heads} * {self.head_dim}")
        if self.num_heads % self.n_groups:
            raise ValueError(f"n_groups: must divide num_heads={self.num_heads}, got {self.n_groups}")
        limit = self.time_step_limit
        if isinstance(limit, (tuple, list)) and len(limit) == 2:
            limit = tuple(_json_float(v) for v in limit)
        if not (isinstance(limit, tuple) and len(limit) == 2 and None not in limit and limit[0] <= limit[1]):
            raise ValueError(f"time_step_limit: expected (low, high) with low <= high, got {self.time_step_limit!r}")
        object.__setattr__(self, "time_step_limit", limit)

    @property
    def scan_chunk_size(self) -> int:
        """The operator's chunk length: the largest power of two <= ``chunk_size``, at least 16 (``gla_scalar``
        takes powers of two >= 16; any chunk length computes the same function)."""
        return max(16, 1 << (self.chunk_size.bit_length() - 1))


class Mamba2LMMixer(RecurrentLayerMixer, Mamba2Mixer):
    """Mamba2Mixer as a backbone mixer: a fixed-size decoding state (``max_len`` is ignored); one-token calls with a
    cache take the recurrent step. Cache per layer: {'ssm': [B, H, N, P] float32, 'conv': [B, W-1, I + 2GN]}."""

    @classmethod
    def from_config(cls, c: Mamba2Config, *, rngs):
        return cls(c.hidden_size, c.num_heads, head_dim=c.head_dim, state_size=c.state_size, expand=c.expand,
                   n_groups=c.n_groups, conv_kernel=c.conv_kernel, use_conv_bias=c.use_conv_bias, use_bias=c.use_bias,
                   layer_norm_epsilon=c.layer_norm_epsilon, time_step_limit=c.time_step_limit,
                   hidden_act=c.hidden_act, time_step_min=c.time_step_min, time_step_max=c.time_step_max,
                   time_step_floor=c.time_step_floor, chunk_size=c.scan_chunk_size, initializer_range=c.initializer_range,
                   dtype=c.compute_dtype, param_dtype=c.params_dtype, rngs=rngs)


class Mamba2ForCausalLM(CausalLM):
    """Mamba2 language model. ``model(input_ids [B, T] int, *, segment_ids=None) -> logits [B, T, vocab] float32``;
    decoding state per layer ``[B, H, N, P]`` + conv tail whatever the context length (see :class:`CausalLM`)."""

    config_class = Mamba2Config
    mixer_class = Mamba2LMMixer


Mamba2Block = Mamba2ForCausalLM.block_class


def mamba2_mixer_flops(c: Mamba2Config, seq_len: int) -> float:
    """Forward FLOPs per token of one Mamba2 layer: in/out projections, the depthwise convolution and the SSD chunk
    form (per head: ``C q kᵀ`` and ``(P ⊙ D) v`` over on average C/2 keys, and the state read and write ``4 N P``)."""
    D, I, H, P, N = c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim, c.state_size
    conv_dim = I + 2 * c.n_groups * N
    proj = 2 * D * (I + conv_dim + H) + 2 * I * D
    conv = 2 * c.conv_kernel * conv_dim
    chunk = min(c.scan_chunk_size, max(int(seq_len), 1))
    ssd = H * (4 * N * P + 2 * (chunk / 2) * (N + P))
    return proj + conv + ssd


def mamba2_hf_layout(c: Mamba2Config, raw: dict | None = None) -> dict[str, HFTensor]:
    """transformers ``Mamba2ForCausalLM`` tensor name -> our stacked parameter (see :class:`HFTensor`)."""
    I, H = c.intermediate_size, c.num_heads
    conv_dim = I + 2 * c.n_groups * c.state_size
    ssm = [("dt_bias", ("dt_bias",), "plain", (H,)),
           ("A_log", ("A_log",), "plain", (H,)),
           ("D", ("D",), "plain", (H,)),
           ("norm.weight", ("norm_weight",), "plain", (I,))]
    return mamba_hf_layout_frame(c, ssm, in_width=I + conv_dim + H, conv_dim=conv_dim)


# Paper scale: the Mamba2 paper's 370M / 1.3B shapes (48 blocks: no MLP, twice GLA's depth; head dim 64, state 128,
# one group) with the 32,000-token vocabulary. Parameters (tests/test_baseline_families.py checks these):
#   mamba2-340m: 349,619,712 (tied)     mamba2-1.3b: 1,371,839,488 (untied)
register_family(Family("mamba2", Mamba2Config, Mamba2ForCausalLM, mixer_flops=mamba2_mixer_flops,
                       hf_layout=mamba2_hf_layout, presets={
    "mamba2-340m": dict(hidden_size=1024, num_hidden_layers=48, num_heads=32, head_dim=64, state_size=128,
                        n_groups=1, vocab_size=32000, tie_word_embeddings=True, initializer_range=0.02),
    "mamba2-1.3b": dict(hidden_size=2048, num_hidden_layers=48, num_heads=64, head_dim=64, state_size=128,
                        n_groups=1, vocab_size=32000, tie_word_embeddings=False, initializer_range=0.02),
    # small CPU models (byte tokenizer ids padded to 320)
    "mamba2-tiny": dict(hidden_size=64, num_hidden_layers=4, num_heads=4, head_dim=32, state_size=16, n_groups=1,
                        vocab_size=320, tie_word_embeddings=True, chunk_size=64, initializer_range=0.02),
    "mamba2-small": dict(hidden_size=256, num_hidden_layers=8, num_heads=8, head_dim=64, state_size=64, n_groups=1,
                         vocab_size=320, tie_word_embeddings=True, chunk_size=64, initializer_range=0.02),
}))

__all__ = ["Mamba2Block", "Mamba2Config", "Mamba2ForCausalLM", "Mamba2LMMixer", "mamba2_hf_layout",
           "mamba2_mixer_flops"]
