"""The Mamba2 (SSD) mixer with the parameters and math of transformers' Mamba2Mixer, on the scalar-gate operator.

    z, xBC, dt = in_proj(u)                      (widths I, I + 2·G·N, H;  I = expand · D = H · P)
    x, B, C    = silu(causal depthwise conv(xBC))
    dt         = clip(softplus(dt + dt_bias), time_step_limit)         [B, T, H] float32
    y_h        = SSD scan: S_t = e^{dt_t A_h} S_{t-1} + B_tᵀ (dt_t x_t),  y_t = C_t S_t + D_h x_t
    out        = out_proj(group_rms_norm(y ⊙ silu(z)) ⊙ norm.weight)

The SSD scan is ``gla_scalar`` with q = C, k = B (each group's B/C shared by H/G consecutive heads), v = dt ⊙ x,
g = dt · A (one log decay per head and step, <= 0 since A = -exp(A_log) < 0) and scale 1 (docs/design.md §9).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.conv import ShortConvolution
from gla_jax.layers.linear import linear_factory
from gla_jax.layers.sharding import param
from gla_jax.layers.ssm_init import a_log_uniform_init, dt_bias_init
from gla_jax.ops.scalar import gla_scalar, gla_scalar_step


def _positive_int(value, name):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def gated_group_rms_norm(y, z, weight, group_size: int, eps: float):
    """(y ⊙ silu(z)) normalised by its RMS over groups of ``group_size`` channels, times ``weight``; float32.
    y, z: [..., I]; weight: [I]."""
    h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    shape = h.shape
    h = h.reshape(shape[:-1] + (shape[-1] // group_size, group_size))
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return h.reshape(shape) * weight.astype(jnp.float32)


class Mamba2Mixer(nnx.Module):
    """Mamba2 token mixer. ``u: [B, T, D]`` -> ``[B, T, D]`` (in ``dtype``).

    Parameters: ``in_proj [D, 2I + 2GN + H]`` (+bias with ``use_bias``), ``conv1d.weight [I + 2GN, W]`` (+bias with
    ``use_conv_bias``), ``dt_bias [H]``, ``A_log [H]``, ``D [H]``, ``norm_weight [I]``, ``out_proj [I, D]``
    (+bias with ``use_bias``). ``num_heads · head_dim`` must equal ``expand · hidden_size``; ``n_groups`` divides
    ``num_heads``. From scratch, ``softplus(dt_bias)`` is log-uniform in [time_step_min, time_step_max] (at least
    ``time_step_floor``), ``exp(A_log)`` uniform in [1, 16] and ``D`` = 1, as in the Mamba2 reference code.
    The decoding cache is ``{"ssm": [B, H, N, P] float32, "conv": [B, W-1, I + 2GN]}``.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, state_size: int = 128,
                 expand: int = 2, n_groups: int = 1, conv_kernel: int = 4, use_conv_bias: bool = True,
                 use_bias: bool = False, layer_norm_epsilon: float = 1e-5,
                 time_step_limit: tuple[float, float] = (0.0, float("inf")), hidden_act: str = "silu",
                 time_step_min: float = 1e-3, time_step_max: float = 1e-1, time_step_floor: float = 1e-4, *,
                 chunk_size: int = 64, initializer_range: float = 0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        D = _positive_int(hidden_size, "hidden_size")
        H = _positive_int(num_heads, "num_heads")
        P = _positive_int(head_dim, "head_dim")
        N = _positive_int(state_size, "state_size")
        G = _positive_int(n_groups, "n_groups")
        W = _positive_int(conv_kernel, "conv_kernel")
        I = expand * D
        if H * P != I:
            raise ValueError(f"num_heads * head_dim: expected expand * hidden_size = {I}, got {H} * {P} = {H * P}")
        if H % G:
            raise ValueError(f"n_groups: expected a divisor of num_heads={H}, got {G}")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act: only 'silu' (the Mamba2 activation) is supported, got {hidden_act!r}")
        if len(time_step_limit) != 2 or not time_step_limit[0] <= time_step_limit[1]:
            raise ValueError(f"time_step_limit: expected (low, high) with low <= high, got {time_step_limit!r}")
        self.hidden_size, self.num_heads, self.head_dim, self.state_size = D, H, P, N
        self.n_groups, self.intermediate_size, self.conv_kernel = G, I, W
        self.conv_dim = I + 2 * G * N
        self.eps = float(layer_norm_epsilon)
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.chunk_size = int(chunk_size)
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        linear = linear_factory(initializer_range, **kw)

        self.in_proj = linear(D, I + self.conv_dim + H, ("embed", None), use_bias)  # a concatenation: replicated
        self.conv1d = ShortConvolution(self.conv_dim, W, bias=use_conv_bias, activation="silu",
                                       initializer_range=initializer_range, axis_name=None, **kw)
        # from scratch as the Mamba2 reference code: softplus(dt_bias) log-uniform in [time_step_min, time_step_max],
        # A = exp(A_log) uniform in [1, 16], D = 1 (layers/ssm_init.py)
        self.dt_bias = param(dt_bias_init(time_step_min, time_step_max, time_step_floor), rngs.params(), (H,),
                             param_dtype, (None,))
        self.A_log = param(a_log_uniform_init(1.0, 16.0), rngs.params(), (H,), param_dtype, (None,))
        self.D = param(nnx.initializers.ones, None, (H,), param_dtype, (None,))
        self.norm_weight = param(nnx.initializers.ones, None, (I,), param_dtype, ("heads",))
        self.out_proj = linear(I, D, ("heads", "embed"), use_bias)

    def init_cache(self, batch_size: int):
        """Zero decoding state: {'ssm': [B, H, N, P] float32, 'conv': [B, W-1, I + 2GN]}."""
        return {"ssm": jnp.zeros((batch_size, self.num_heads, self.state_size, self.head_dim), jnp.float32),
                "conv": jnp.zeros((batch_size, self.conv_kernel - 1, self.conv_dim), self.dtype)}

    def _scan_inputs(self, u, conv_cache, segment_ids, return_cache):
        """-> q = C, k = B [B, T, H, N]; v = dt x [B, T, H, P]; g = dt A [B, T, H]; x; z; new conv cache."""
        I, H, P, G, N = self.intermediate_size, self.num_heads, self.head_dim, self.n_groups, self.state_size
        proj = self.in_proj(u.astype(self.dtype))
        z, xbc, dt = proj[..., :I], proj[..., I:I + self.conv_dim], proj[..., I + self.conv_dim:]
        xbc, conv_cache = self.conv1d(xbc, segment_ids=segment_ids, cache=conv_cache, output_final_state=return_cache)
        Bt, T = u.shape[:2]
        x = xbc[..., :I].reshape(Bt, T, H, P)
        Bm = jnp.repeat(xbc[..., I:I + G * N].reshape(Bt, T, G, N), H // G, axis=2)
        Cm = jnp.repeat(xbc[..., I + G * N:].reshape(Bt, T, G, N), H // G, axis=2)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        lo, hi = self.time_step_limit
        if (lo, hi) != (0.0, float("inf")):
            dt = jnp.clip(dt, lo, hi)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        v = x.astype(jnp.float32) * dt[..., None]
        return Cm, Bm, v, dt * A, x, z, conv_cache

    def _output(self, o, x, z):
        y = o.astype(jnp.float32) + x.astype(jnp.float32) * self.D[...].astype(jnp.float32)[:, None]
        y = y.reshape(y.shape[:-2] + (self.intermediate_size,))
        y = gated_group_rms_norm(y, z, self.norm_weight[...], self.intermediate_size // self.n_groups, self.eps)
        return self.out_proj(y.astype(self.dtype))

    def __call__(self, u, *, segment_ids=None, cache=None, return_cache: bool = False):
        """u: [B, T, D]; segment_ids: [B, T] int (packed documents: no state or conv tap crosses a start); cache:
        from :meth:`init_cache` or a previous call. Returns y [B, T, D], or (y, new cache) with ``return_cache``."""
        if u.ndim != 3 or u.shape[-1] != self.hidden_size:
            raise ValueError(f"u: expected shape [B, T, {self.hidden_size}], got {u.shape}")
        q, k, v, g, x, z, conv_cache = self._scan_inputs(u, None if cache is None else cache["conv"], segment_ids,
                                                         return_cache)
        o, s = gla_scalar(q, k, v, g, scale=1.0, initial_state=None if cache is None else cache["ssm"],
                          output_final_state=return_cache, segment_ids=segment_ids, chunk_size=self.chunk_size)
        out = self._output(o, x, z)
        return (out, {"ssm": s, "conv": conv_cache}) if return_cache else out

    def step(self, u_t, cache):
        """One decoding step in O(1) state: u_t [B, D] -> (y_t [B, D], new cache)."""
        if u_t.ndim != 2 or u_t.shape[-1] != self.hidden_size:
            raise ValueError(f"u_t: expected shape [B, {self.hidden_size}], got {u_t.shape}")
        q, k, v, g, x, z, conv_cache = self._scan_inputs(u_t[:, None], cache["conv"], None, True)
        o, s = gla_scalar_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], cache["ssm"], scale=1.0)
        return self._output(o[:, None], x, z)[:, 0], {"ssm": s, "conv": conv_cache}
