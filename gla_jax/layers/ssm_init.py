"""Initialisers of the selective state space layers (Mamba, Mamba2) for training from scratch, as in their papers'
reference code and transformers (a loaded checkpoint overwrites them; docs/design.md §9).

* time-step bias: ``dt = exp(U(log dt_min, log dt_max))`` clamped below at ``floor``, stored as its inverse softplus
  (``bias = dt + log(1 - exp(-dt))``), so that at initialisation ``softplus(bias)`` is log-uniform in
  ``[dt_min, dt_max]`` (default 1e-3 .. 1e-1);
* Mamba2's per-head decay rate ``A = U(a_min, a_max)`` (default 1 .. 16), stored as ``A_log = log A``;
* Mamba's per-channel rates are S4D-real (``A_log[i, n] = log(n + 1)``; made in ``layers/mamba.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check_range(low: float, high: float, low_name: str, high_name: str) -> None:
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 < low <= high):
        raise ValueError(f"{low_name}, {high_name}: expected 0 < {low_name} <= {high_name}, got {low!r}, {high!r}")


def inverse_softplus(y):
    """x with softplus(x) = y for y > 0 (float32 or wider): ``y + log(1 - exp(-y))``."""
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 1e-1, floor: float = 1e-4):
    """An initializer ``(key, shape, dtype) -> bias`` whose ``softplus`` is log-uniform in [dt_min, dt_max] and at
    least ``floor`` (Mamba's ``dt_proj.bias``, Mamba2's ``dt_bias``)."""
    _check_range(dt_min, dt_max, "time_step_min", "time_step_max")
    if not (isinstance(floor, (int, float)) and floor >= 0):
        raise ValueError(f"time_step_floor: expected a number >= 0, got {floor!r}")

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
        return inverse_softplus(dt).astype(dtype)

    return init


def a_log_uniform_init(a_min: float = 1.0, a_max: float = 16.0):
    """An initializer ``(key, shape, dtype) -> A_log`` with ``exp(A_log)`` uniform in [a_min, a_max] (Mamba2's
    per-head decay rates, the reference code's ``A_init_range``)."""
    _check_range(a_min, a_max, "a_min", "a_max")

    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, a_min, a_max)).astype(dtype)

    return init
