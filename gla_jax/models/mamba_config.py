"""What transformers' Mamba and Mamba2 share (docs/design.md §9.4): the config fields and checks (one base for
:class:`gla_jax.models.mamba.MambaConfig` and :class:`gla_jax.models.mamba2.Mamba2Config`) and the frame of their
tensor maps (:func:`mamba_hf_layout_frame`)."""

from __future__ import annotations

import dataclasses

from gla_jax.models.config import ModelConfig
from gla_jax.models.registry import HFTensor


@dataclasses.dataclass(frozen=True)
class MambaFamilyConfig(ModelConfig):
    """Fields both transformers Mamba configs have, with ``MambaConfig``'s defaults (Mamba2 overrides the sizes,
    token ids and tying). ``time_step_min/max/floor`` set the from-scratch time-step bias (docs/design.md §9.3);
    ``time_step_rank`` (Mamba2), ``rescale_prenorm_residual``, ``residual_in_fp32``, ``use_cache`` and the token
    ids only choose PyTorch's initialisation or bookkeeping and are kept for round trips (the residual stream is in the compute dtype here). Blocks are ``x += mixer(norm(x))``
    with no MLP. A subclass lists :data:`MAMBA_FAMILY_FIELDS` and its own in ``HF_FIELDS``."""

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
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    rescale_prenorm_residual: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = True

    HF_UNSUPPORTED = (("hidden_act", lambda v: v in ("silu", "swish"), "only the silu activation is supported"),)
    HF_KERNEL_KEYS = {}
    HF_ACT_NAMES = {}

    def _check_mamba(self, *sizes: str):
        """Checks the shared fields of :class:`ModelConfig`, that each field named in ``sizes`` is a positive int,
        and the activation; ValueError naming the field."""
        self._check_shared()
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act: only 'silu' is supported, got {self.hidden_act!r}")

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


#: The transformers config fields every :class:`MambaFamilyConfig` has.
MAMBA_FAMILY_FIELDS = (frozenset(f.name for f in dataclasses.fields(MambaFamilyConfig))
                       - frozenset(f.name for f in dataclasses.fields(ModelConfig)))


def mamba_hf_layout_frame(c: MambaFamilyConfig, ssm_rows, *, in_width: int, conv_dim: int) -> dict[str, HFTensor]:
    """The transformers tensor map of a Mamba-style model (see :class:`HFTensor`): per mixer ``in_proj``
    [in_width, D], ``conv1d`` [conv_dim, 1, W], the family's ``ssm_rows`` (its own parameters, as in
    ``HFTensor.backbone_layout``), ``out_proj`` [D, I], and the biases ``use_bias`` / ``use_conv_bias`` add."""
    D, I = c.hidden_size, c.intermediate_size
    rows = [("in_proj.weight", ("in_proj", "kernel"), "linear", (in_width, D)),
            ("conv1d.weight", ("conv1d", "weight"), "conv", (conv_dim, 1, c.conv_kernel)),
            *ssm_rows,
            ("out_proj.weight", ("out_proj", "kernel"), "linear", (D, I))]
    if c.use_bias:
        rows += [("in_proj.bias", ("in_proj", "bias"), "plain", (in_width,)),
                 ("out_proj.bias", ("out_proj", "bias"), "plain", (D,))]
    if c.use_conv_bias:
        rows.append(("conv1d.bias", ("conv1d", "bias"), "plain", (conv_dim,)))
    return HFTensor.backbone_layout(c, rows, vocab=c.vocab_size)
