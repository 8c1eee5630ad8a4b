"""SwiGLU feed-forward block (fla ``GatedMLP``): ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.linear import linear_factory


def default_intermediate_size(hidden_size: int, hidden_ratio: float | None = 4) -> int:
    """``int(D · hidden_ratio · 2/3)`` rounded up to a multiple of 256 (fla's rule; D=1024 -> 2816, 2048 -> 5632)."""
    ratio = 4 if hidden_ratio is None else hidden_ratio
    size = int(hidden_size * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


class GatedMLP(nnx.Module):
    """SwiGLU MLP. ``x: [..., D]`` -> ``[..., D]`` in ``dtype``.

    Parameters (nnx.Linear kernels, stored ``[in, out]``): ``gate_proj`` and ``up_proj`` ``[D, I]`` (embed, mlp),
    ``down_proj`` ``[I, D]`` (mlp, embed); no biases.
    """

    def __init__(self, hidden_size: int, intermediate_size: int | None = None, *, hidden_ratio: float | None = 4,
                 hidden_act: str = "swish", initializer_range: float = 0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if hidden_act not in ("swish", "silu"):
            raise ValueError(f"hidden_act must be 'swish' (SwiGLU), got {hidden_act!r}")
        if intermediate_size is None:
            intermediate_size = default_intermediate_size(hidden_size, hidden_ratio)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        linear = linear_factory(initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(hidden_size, intermediate_size, ("embed", "mlp"))
        self.up_proj = linear(hidden_size, intermediate_size, ("embed", "mlp"))
        self.down_proj = linear(intermediate_size, hidden_size, ("mlp", "embed"))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
