"""``nnx.Linear`` projections whose parameters carry logical axis names, built the one way every layer builds them."""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from gla_jax.layers.sharding import with_axes


def linear_factory(initializer_range: float, *, dtype, param_dtype, rngs: nnx.Rngs):
    """Returns ``linear(n_in, n_out, axes, bias=False) -> nnx.Linear`` for one layer's projections.

    Each made ``nnx.Linear`` has a kernel ``[n_in, n_out]`` drawn from N(0, initializer_range²) with the logical
    ``axes`` (two names, see ``sharding.py``) and, with ``bias``, a zero bias ``[n_out]`` with ``axes[1:]``; it
    computes in ``dtype`` and stores ``param_dtype``. Parameters are drawn from ``rngs`` in the order of the calls.
    """
    init = nnx.initializers.normal(initializer_range)

    def linear(n_in: int, n_out: int, axes: Sequence[str | None], bias: bool = False) -> nnx.Linear:
        return nnx.Linear(n_in, n_out, use_bias=bias, kernel_init=with_axes(init, axes),
                          bias_init=with_axes(nnx.initializers.zeros, axes[1:]), dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

    return linear
