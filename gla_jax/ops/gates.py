"""Zero forget gates (α = 0, log gate g = −inf): how the chunkwise forms keep them exact (docs/design.md §2).

A log gate g <= ``ZERO_LOG_GATE`` (−inf included) is a *zero gate*: α = e^g is exactly 0 in float32 (e^−104
rounds to 0), so the recurrence S_t = diag(e^{g_t}) S_{t-1} + k_tᵀ v_t forgets that channel's past completely.
The chunkwise and parallel forms never see such a gate in a cumulative sum: −inf there would make every later
difference −inf − (−inf) = NaN, and any finite stand-in big enough to underflow (~−1e2 .. −1e4) would push the
cumulative sums of the following positions to a magnitude where float32 keeps only ~1e-5 .. 1e-3 of their small
gates (float32 has 24 bits: at |b| ≈ 128 the spacing is 1.5e-5).

Instead each gate is split into two exactly summable parts:

  * ``finite_gates(g)``: the gate with zero gates replaced by 0 (its cumulative sum stays as precise as
    without zero gates);
  * ``zero_steps(g)``: ``ZERO_GATE_STEP`` (−256) at zero gates, else 0. Its cumulative sum is a multiple of 256 and
    therefore exact in float32 for any realistic length (|sum| < 2^24 · 256).

Every decay factor e^{b_i − b_j} of the chunkwise forms (b the cumulative gate from some origin, i at or after
j) becomes e^{(b_i − b_j) + (z_i − z_j)} with z the cumulative zero steps: when no zero gate lies in (j, i] the
second difference is exactly 0 and the factor is bit-for-bit what it was; when one does, the exponent is
<= −256 and the factor is exactly 0, as in the recurrence. The exponent stays <= 0 (and finite) in both cases,
so the stability contract (exponents <= 0, log α down to −20 per step exact) is unchanged. Because the identity
of the gate gradient only needs the decays to be functions of gate differences, dg at every other position is
unchanged too; at a zero gate itself dg is defined as 0, the limit g → −∞ of the true derivative (every term
that depends on g_t carries a factor e^{g_t}), which is also what the float64 recurrence's autodiff gives.

NaN is not a zero gate (a NaN or +inf gate stays non-finite and poisons what it reaches, see ``gla``).
"""

from __future__ import annotations

import jax.numpy as jnp

#: Log gates at or below this are zero gates (α = 0): e^{-104} rounds to exactly 0 in float32, so the float32
#: recurrence itself treats them as α = 0; the float64 one differs by e^{-104} ≈ 7e-46 relative.
ZERO_LOG_GATE = -104.0

#: The exponent added for every zero gate between two positions: a power of two (so cumulative sums of it are
#: exact), far enough below ``ZERO_LOG_GATE`` that e^{x + ZERO_GATE_STEP} is exactly 0 for any x <= 0.
ZERO_GATE_STEP = -256.0


def is_zero_gate(g):
    """bool mask of the zero gates of ``g`` (g <= ``ZERO_LOG_GATE``, −inf included; NaN is not one)."""
    return g <= ZERO_LOG_GATE


def finite_gates(g):
    """float32 gates with the zero gates replaced by 0 (same shape as ``g``)."""
    g = jnp.asarray(g).astype(jnp.float32)
    return jnp.where(is_zero_gate(g), 0.0, g)


def zero_steps(g):
    """float32 ``ZERO_GATE_STEP`` where ``g`` is a zero gate, else 0 (same shape as ``g``)."""
    return jnp.where(is_zero_gate(jnp.asarray(g)), ZERO_GATE_STEP, 0.0).astype(jnp.float32)
