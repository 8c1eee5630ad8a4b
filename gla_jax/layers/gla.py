"""The Gated Linear Attention layer (fla-compatible parameters and math; docs/design.md §3)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.conv import ShortConvolution
from gla_jax.layers.norm import RMSNorm, rms_norm
from gla_jax.layers.sharding import mesh_axes, with_axes
from gla_jax.ops import gla as gla_op
from gla_jax.ops import registry

GATES = ("gla", "scalar", "fixed", "none")
_FEATURE_MAPS = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "logsigmoid": jax.nn.log_sigmoid,
    "sqrelu": lambda x: jnp.square(jax.nn.relu(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
_GATE_FNS = {"swish": jax.nn.silu, "silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu,
             "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def _exact_dim(hidden_size: int, expand: float, name: str) -> int:
    dim = hidden_size * expand
    if not math.isclose(dim, round(dim)):
        raise ValueError(f"{name}: hidden_size * {name} must be an integer, got {dim}")
    return int(round(dim))


def fixed_decay_log(num_heads: int):
    """RetNet-style per-head constant log decay ``log(1 - 2^(-5-h))``, h = 0..H-1 ([H] float32)."""
    h = jnp.arange(num_heads, dtype=jnp.float32)
    return jnp.log1p(-jnp.exp2(-5.0 - h))


class GatedLinearAttention(nnx.Module):
    """GLA token mixer. ``x: [B, T, D]`` -> ``[B, T, D]`` (in ``dtype``).

    key width ``Dk = D·expand_k``, value width ``Dv = D·expand_v``, split into ``num_heads`` heads; with
    ``num_kv_heads < num_heads`` the k/v/gate projections have ``num_kv_heads`` heads, each repeated for its group of
    consecutive query heads (fla's layout). Parameters: ``q_proj [D, Dk]``, ``k_proj [D, Dk/G]``, ``v_proj [D, Dv/G]``,
    ``g_proj [D, Dv]`` (output gate), ``o_proj [Dv, D]``, ``gk_proj_0 [D, r]`` (no bias), ``gk_proj_1 [r, Dk/G]`` (+bias),
    ``g_norm`` (per-head RMSNorm, weight ``[Dv/H]``), with ``use_short_conv`` ``q_conv1d/k_conv1d/v_conv1d``.

    ``gate``: ``"gla"`` (per-key data-dependent, the paper), ``"scalar"`` (one data-dependent gate per head,
    ``gk_proj_1 [r, num_kv_heads]``), ``"fixed"`` (per-head constant RetNet decay, no gate parameters),
    ``"none"`` (no decay: plain linear attention).
    """

    def __init__(self, hidden_size: int = 1024, expand_k: float = 0.5, expand_v: float = 1.0, num_heads: int = 4,
                 num_kv_heads: int | None = None, feature_map: str | None = None, use_short_conv: bool = False,
                 conv_size: int = 4, conv_bias: bool = False, use_output_gate: bool = True, gate_fn: str = "swish",
                 elementwise_affine: bool | None = True, norm_eps: float = 1e-5, gate_logit_normalizer: float = 16,
                 gate_low_rank_dim: int = 16, clamp_min: float | None = None, *, gate: str = "gla",
                 impl: str = "auto", chunk_size: int = 64, initializer_range: float = 0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads, got num_heads={num_heads}, "
                             f"num_kv_heads={num_kv_heads}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        registry.check_impl(impl)
        if feature_map is not None and feature_map not in _FEATURE_MAPS:
            raise ValueError(f"feature_map must be None or one of {sorted(_FEATURE_MAPS)}, got {feature_map!r}")
        if gate_fn not in _GATE_FNS:
            raise ValueError(f"gate_fn must be one of {sorted(_GATE_FNS)}, got {gate_fn!r}")
        self.hidden_size = int(hidden_size)
        self.num_heads = int(num_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.key_dim = _exact_dim(hidden_size, expand_k, "expand_k")
        self.value_dim = _exact_dim(hidden_size, expand_v, "expand_v")
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(f"num_heads={num_heads} must divide key dim {self.key_dim} and value dim "
                             f"{self.value_dim}")
        self.head_k_dim = self.key_dim // self.num_heads
        self.head_v_dim = self.value_dim // self.num_heads
        self.key_dim_per_group = self.key_dim // self.num_kv_groups
        self.value_dim_per_group = self.value_dim // self.num_kv_groups
        self.feature_map = feature_map
        self.use_short_conv = bool(use_short_conv)
        self.conv_size = int(conv_size)
        self.use_output_gate = bool(use_output_gate)
        self.gate_fn = gate_fn
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.clamp_min = None if clamp_min is None else float(clamp_min)
        self.gate = gate
        self.impl = impl
        self.chunk_size = int(chunk_size)
        self.dtype = dtype

        init = nnx.initializers.normal(initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def linear(n_in, n_out, axes, bias=False):
            return nnx.Linear(n_in, n_out, use_bias=bias, kernel_init=with_axes(init, axes),
                              bias_init=with_axes(nnx.initializers.zeros, axes[1:]), **kw)

        D = self.hidden_size
        self.q_proj = linear(D, self.key_dim, ("embed", "heads"))
        self.k_proj = linear(D, self.key_dim_per_group, ("embed", "kv"))
        self.v_proj = linear(D, self.value_dim_per_group, ("embed", "kv"))
        self.g_proj = linear(D, self.value_dim, ("embed", "heads")) if self.use_output_gate else None
        if self.use_short_conv:
            ckw = dict(bias=conv_bias, activation="silu", initializer_range=initializer_range, **kw)
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, axis_name="heads", **ckw)
            self.k_conv1d = ShortConvolution(self.key_dim_per_group, conv_size, axis_name="kv", **ckw)
            self.v_conv1d = ShortConvolution(self.value_dim_per_group, conv_size, axis_name="kv", **ckw)
        else:
            self.q_conv1d = self.k_conv1d = self.v_conv1d = None
        if gate in ("gla", "scalar"):
            gk_out = self.key_dim_per_group if gate == "gla" else self.num_kv_heads
            self.gk_proj_0 = linear(D, int(gate_low_rank_dim), ("embed", None))
            self.gk_proj_1 = linear(int(gate_low_rank_dim), gk_out, (None, "kv"), bias=True)
        else:
            self.gk_proj_0 = self.gk_proj_1 = None
        self.o_proj = linear(self.value_dim, D, ("heads", "embed"))
        self.g_norm = RMSNorm(self.head_v_dim, eps=norm_eps, elementwise_affine=bool(elementwise_affine),
                              dtype=jnp.float32, param_dtype=param_dtype)

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _heads(self, x, head_dim):
        """[B, T, n·head_dim] -> [B, T, H, head_dim], repeating kv heads over their groups when n < H."""
        B, T, _ = x.shape
        x = x.reshape(B, T, -1, head_dim)
        if x.shape[2] != self.num_heads:
            x = jnp.repeat(x, self.num_kv_groups, axis=2)
        return x

    def _log_gate(self, x):
        """log forget gate g: [B, T, H, Dk/H] float32 (<= 0)."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_k_dim
        if self.gate == "none":
            return jnp.zeros((B, T, H, K), jnp.float32)
        if self.gate == "fixed":
            return jnp.broadcast_to(fixed_decay_log(H)[None, None, :, None], (B, T, H, K))
        z = self.gk_proj_1(self.gk_proj_0(x)).astype(jnp.float32)
        g = jax.nn.log_sigmoid(z) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            g = jnp.maximum(g, self.clamp_min)
        if self.gate == "gla":
            return self._heads(g, K)
        g = self._heads(g, 1)  # scalar: [B, T, H, 1]
        return jnp.broadcast_to(g, (B, T, H, K))

    def _step(self, q, k, v, g, state):
        """Single-token recurrent update in float32: S = diag(exp g) S + kᵀv, o = (q/sqrt(K)) S."""
        f32 = jnp.float32
        q, k, v, g = (a[:, 0].astype(f32) for a in (q, k, v, g))  # [B, H, *]
        s = state.astype(f32) * jnp.exp(g)[..., None] + k[..., :, None] * v[..., None, :]
        o = jnp.einsum("bhk,bhkv->bhv", q * self.head_k_dim ** -0.5, s)
        return o[:, None].astype(self.dtype), s

    def init_cache(self, batch_size: int):
        """Zero decoding state: {'recurrent': [B, H, K, V] float32, 'conv': (q, k, v) tails [B, W-1, C] or None}."""
        s = jnp.zeros((batch_size, self.num_heads, self.head_k_dim, self.head_v_dim), jnp.float32)
        conv = None
        if self.use_short_conv:
            W = self.conv_size - 1
            conv = tuple(jnp.zeros((batch_size, W, c), self.dtype)
                         for c in (self.key_dim, self.key_dim_per_group, self.value_dim_per_group))
        return {"recurrent": s, "conv": conv}

    def __call__(self, x, *, segment_ids=None, cache=None, return_cache: bool = False, impl: str | None = None):
        """x: [B, T, D]; segment_ids: [B, T] int (packed documents); cache: a dict from :meth:`init_cache` or a
        previous call (state before x; it belongs to the first document). Returns y [B, T, D], or (y, new_cache)
        with ``return_cache``. ``impl`` overrides the layer's operator form for this call."""
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, {self.hidden_size}], got shape {x.shape}")
        impl = self.impl if impl is None else impl
        x = x.astype(self.dtype)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_cache = None
        if self.use_short_conv:
            cq, ck, cv = cache["conv"] if cache is not None and cache.get("conv") is not None else (None,) * 3
            q, cq = self.q_conv1d(q, segment_ids=segment_ids, cache=cq, output_final_state=return_cache)
            k, ck = self.k_conv1d(k, segment_ids=segment_ids, cache=ck, output_final_state=return_cache)
            v, cv = self.v_conv1d(v, segment_ids=segment_ids, cache=cv, output_final_state=return_cache)
            conv_cache = (cq, ck, cv)
        q = self._heads(q, self.head_k_dim)
        k = self._heads(k, self.head_k_dim)
        v = self._heads(v, self.head_v_dim)
        g = self._log_gate(x)
        if self.feature_map is not None:
            fm = _FEATURE_MAPS[self.feature_map]
            q, k = fm(q), fm(k)
        state = None if cache is None else cache["recurrent"]
        if state is not None and x.shape[1] == 1 and impl == "recurrent":
            o, new_state = self._step(q, k, v, g, state)  # one decoding step: the recurrent update, no scan
        else:
            # Under a mesh with logical axis rules, kernel backends are shard-mapped over batch and heads.
            o, new_state = gla_op(q, k, v, g, initial_state=state, output_final_state=return_cache,
                                  segment_ids=segment_ids, impl=impl, chunk_size=self.chunk_size,
                                  batch_axes=mesh_axes("batch"), head_axes=mesh_axes("heads"))
        w = self.g_norm.weight[...] if self.g_norm.weight is not None else None
        o = rms_norm(o, w, self.g_norm.eps)  # float32 [B, T, H, Dv/H]
        B, T = x.shape[:2]
        o = o.reshape(B, T, self.value_dim)
        if self.use_output_gate:
            o = o * _GATE_FNS[self.gate_fn](self.g_proj(x).astype(jnp.float32))
        y = self.o_proj(o.astype(self.dtype))
        if return_cache:
            return y, {"recurrent": new_state, "conv": conv_cache}
        return y
