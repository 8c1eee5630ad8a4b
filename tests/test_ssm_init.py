"""From-scratch initialisation of the Mamba and Mamba2 mixers against the formulas of their papers' reference code
(not against the code): softplus(dt bias) log-uniform in [1e-3, 1e-1] (floor 1e-4), Mamba's S4D-real A_log[i, n] =
log(n + 1), Mamba2's A = exp(A_log) uniform in [1, 16], D = 1. Distributions are checked with a Kolmogorov-Smirnov
statistic against the exact CDF (fixed seeds: deterministic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flax import nnx

from gla_jax.layers.mamba import MambaMixer
from gla_jax.layers.mamba2 import Mamba2Mixer
from gla_jax.layers.ssm_init import dt_bias_init

DT_MIN, DT_MAX = 1e-3, 1e-1


def softplus64(x):
    x = np.asarray(x, np.float64)
    return np.logaddexp(0.0, x)


def ks_uniform(samples, low, high):
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and U(low, high)."""
    x = np.sort(np.asarray(samples, np.float64))
    n = len(x)
    cdf = np.clip((x - low) / (high - low), 0.0, 1.0)
    return max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))


def ks_bound(n):  # the 0.1% critical value of the one-sample KS test
    return 1.95 / math.sqrt(n)


def check_log_uniform_dt(bias):
    dt = softplus64(bias).ravel()
    assert dt.min() >= DT_MIN * (1 - 1e-5) and dt.max() <= DT_MAX * (1 + 1e-5)
    assert ks_uniform(np.log(dt), math.log(DT_MIN), math.log(DT_MAX)) < ks_bound(dt.size)


def test_mamba2_init_matches_reference_formulas():
    # many heads (head_dim 1) so the per-head draws form a distribution
    H = 1024
    m = Mamba2Mixer(512, num_heads=H, head_dim=1, state_size=4, expand=2, rngs=nnx.Rngs(0))
    check_log_uniform_dt(m.dt_bias[...])
    a = np.exp(np.asarray(m.A_log[...], np.float64))
    assert a.min() >= 1.0 - 1e-5 and a.max() <= 16.0 + 1e-4
    assert ks_uniform(a, 1.0, 16.0) < ks_bound(H)
    np.testing.assert_array_equal(np.asarray(m.D[...]), np.ones(H))


def test_mamba_init_matches_reference_formulas():
    D, N = 512, 8
    m = MambaMixer(D, state_size=N, expand=2, rngs=nnx.Rngs(0))
    I, R = 2 * D, math.ceil(D / 16)
    check_log_uniform_dt(m.dt_proj.bias[...])
    np.testing.assert_allclose(np.asarray(m.A_log[...]), np.log(np.tile(np.arange(1.0, N + 1), (I, 1))), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.D[...]), np.ones(I))
    w = np.asarray(m.dt_proj.kernel[...], np.float64)
    assert w.shape == (R, I)
    assert ks_uniform(w.ravel(), -R ** -0.5, R ** -0.5) < ks_bound(w.size)


def test_mamba_constant_dt_scheme_and_floor():
    m = MambaMixer(64, state_size=4, time_step_init_scheme="constant", time_step_scale=2.0, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(np.asarray(m.dt_proj.kernel[...]), 2.0 / math.sqrt(4), rtol=1e-6)
    # a floor above dt_max lifts every step to the floor
    import jax
    b = dt_bias_init(1e-3, 1e-2, floor=0.05)(jax.random.key(0), (256,))
    np.testing.assert_allclose(softplus64(b), 0.05, rtol=1e-4)


def test_init_bad_arguments_are_named():
    with pytest.raises(ValueError, match="time_step_init_scheme"):
        MambaMixer(32, time_step_init_scheme="zeros", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="time_step_min"):
        Mamba2Mixer(32, num_heads=4, head_dim=16, time_step_min=0.5, time_step_max=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="time_step_floor"):
        dt_bias_init(1e-3, 1e-1, floor=-1.0)
