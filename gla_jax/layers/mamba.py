"""The Mamba (v1) mixer: selective state space layer with the parameters and math of transformers' MambaMixer.

    x, z   = in_proj(u)                          (two halves of width I = expand · D)
    x      = silu(causal depthwise conv(x))
    dt, B, C = x_proj(x)                         (widths R = time_step_rank, N, N)
    dt     = softplus(dt_proj(dt))               ([B, T, I], float32)
    y      = selective_scan(x, dt, -exp(A_log), B, C, D, z)     (docs/design.md §9)
    out    = out_proj(y)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.conv import ShortConvolution
from gla_jax.layers.linear import linear_factory
from gla_jax.layers.sharding import param, with_axes
from gla_jax.layers.ssm_init import dt_bias_init
from gla_jax.ops.selective_scan import selective_scan, selective_scan_step


def _positive_int(value, name):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class MambaMixer(nnx.Module):
    """Mamba v1 token mixer. ``u: [B, T, D]`` -> ``[B, T, D]`` (in ``dtype``).

    Parameters (``nnx.Linear`` kernels are ``[in, out]``): ``in_proj [D, 2I]`` (+bias with ``use_bias``),
    ``conv1d.weight [I, W]`` (+``.bias [I]`` with ``use_conv_bias``), ``x_proj [I, R + 2N]`` (no bias),
    ``dt_proj [R, I]`` (+bias), ``A_log [I, N]``, ``D [I]``, ``out_proj [I, D]`` (+bias with ``use_bias``).
    ``time_step_rank="auto"`` is ceil(D / 16) as in transformers. From scratch (as the Mamba reference code and
    transformers): ``A_log[i, n] = log(n + 1)`` (S4D-real), ``D`` = 1, ``softplus(dt_proj.bias)`` log-uniform in
    [time_step_min, time_step_max] (at least ``time_step_floor``), ``dt_proj.kernel`` U(±time_step_scale/sqrt(R)). The decoding cache is
    ``{"ssm": [B, I, N] float32, "conv": [B, W-1, I]}`` (O(1) in the sequence length).
    """

    def __init__(self, hidden_size: int, state_size: int = 16, expand: int = 2, conv_kernel: int = 4,
                 time_step_rank: int | str = "auto", use_conv_bias: bool = True, use_bias: bool = False,
                 hidden_act: str = "silu", time_step_min: float = 1e-3, time_step_max: float = 1e-1,
                 time_step_floor: float = 1e-4, time_step_scale: float = 1.0, time_step_init_scheme: str = "random",
                 *, chunk_size: int = 64, initializer_range: float = 0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        D = _positive_int(hidden_size, "hidden_size")
        N = _positive_int(state_size, "state_size")
        W = _positive_int(conv_kernel, "conv_kernel")
        I = _positive_int(int(expand * D) if float(expand * D).is_integer() else -1, "expand * hidden_size")
        R = math.ceil(D / 16) if time_step_rank == "auto" else _positive_int(time_step_rank, "time_step_rank")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act: only 'silu' (the Mamba activation) is supported, got {hidden_act!r}")
        self.hidden_size, self.state_size, self.intermediate_size, self.time_step_rank = D, N, I, R
        self.conv_kernel = W
        self.chunk_size = _positive_int(chunk_size, "chunk_size")
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        linear = linear_factory(initializer_range, **kw)

        # the in/x projections' outputs are concatenations of differently-used pieces: replicated output axis
        self.in_proj = linear(D, 2 * I, ("embed", None), use_bias)
        self.conv1d = ShortConvolution(I, W, bias=use_conv_bias, activation="silu", initializer_range=initializer_range,
                                       axis_name="heads", **kw)
        self.x_proj = linear(I, R + 2 * N, ("heads", None), False)
        # from scratch as the Mamba reference code: dt_proj's kernel U(±scale/sqrt(R)) ("random") or that constant
        # ("constant"), its bias with softplus(bias) log-uniform in [time_step_min, time_step_max] (ssm_init.py)
        if time_step_init_scheme not in ("random", "constant"):
            raise ValueError(f"time_step_init_scheme: expected 'random' or 'constant', got {time_step_init_scheme!r}")
        dt_std = float(time_step_scale) * R ** -0.5
        dt_kernel = (nnx.initializers.constant(dt_std) if time_step_init_scheme == "constant"
                     else lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -dt_std, dt_std))
        self.dt_proj = nnx.Linear(R, I, use_bias=True, kernel_init=with_axes(dt_kernel, (None, "heads")),
                                  bias_init=with_axes(dt_bias_init(time_step_min, time_step_max, time_step_floor),
                                                      ("heads",)), **kw)
        a_init = lambda key, shape, dt: jnp.log(jnp.broadcast_to(jnp.arange(1, shape[1] + 1, dtype=dt), shape))
        self.A_log = param(a_init, None, (I, N), param_dtype, ("heads", None))
        self.D = param(nnx.initializers.ones, None, (I,), param_dtype, ("heads",))
        self.out_proj = linear(I, D, ("heads", "embed"), use_bias)

    def init_cache(self, batch_size: int):
        """Zero decoding state: {'ssm': [B, I, N] float32, 'conv': [B, W-1, I]}."""
        return {"ssm": jnp.zeros((batch_size, self.intermediate_size, self.state_size), jnp.float32),
                "conv": jnp.zeros((batch_size, self.conv_kernel - 1, self.intermediate_size), self.dtype)}

    def _ssm_inputs(self, u, conv_cache, return_cache, segment_ids=None):
        x, z = jnp.split(self.in_proj(u.astype(self.dtype)), 2, axis=-1)
        x, conv_cache = self.conv1d(x, segment_ids=segment_ids, cache=conv_cache, output_final_state=return_cache)
        R, N = self.time_step_rank, self.state_size
        dbc = self.x_proj(x)
        dt = jax.nn.softplus(self.dt_proj(dbc[..., :R]).astype(jnp.float32))
        Bm, Cm = dbc[..., R:R + N].astype(jnp.float32), dbc[..., R + N:].astype(jnp.float32)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        return x, z, dt, A, Bm, Cm, conv_cache

    def __call__(self, u, *, segment_ids=None, cache=None, return_cache: bool = False):
        """u: [B, T, D]; segment_ids: [B, T] int (packed documents: no state or conv tap crosses a start); cache: from
        :meth:`init_cache` or a previous call (the state before u; it belongs to the first document).
        Returns y [B, T, D], or (y, new cache) with ``return_cache``."""
        if u.ndim != 3 or u.shape[-1] != self.hidden_size:
            raise ValueError(f"u: expected shape [B, T, {self.hidden_size}], got {u.shape}")
        x, z, dt, A, Bm, Cm, conv_cache = self._ssm_inputs(u, None if cache is None else cache["conv"], return_cache,
                                                           segment_ids)
        y, h = selective_scan(x, dt, A, Bm, Cm, self.D[...], z, initial_state=None if cache is None else cache["ssm"],
                              output_final_state=return_cache, chunk_size=self.chunk_size, segment_ids=segment_ids)
        out = self.out_proj(y.astype(self.dtype))
        return (out, {"ssm": h, "conv": conv_cache}) if return_cache else out

    def step(self, u_t, cache):
        """One decoding step in O(1) state: u_t [B, D], cache from :meth:`init_cache` -> (y_t [B, D], new cache)."""
        if u_t.ndim != 2 or u_t.shape[-1] != self.hidden_size:
            raise ValueError(f"u_t: expected shape [B, {self.hidden_size}], got {u_t.shape}")
        x, z, dt, A, Bm, Cm, conv_cache = self._ssm_inputs(u_t[:, None], cache["conv"], True)
        y, h = selective_scan_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], self.D[...], z[:, 0], cache["ssm"])
        return self.out_proj(y.astype(self.dtype)), {"ssm": h, "conv": conv_cache}
