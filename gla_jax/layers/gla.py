"""The Gated Linear Attention layer (fla-compatible parameters and math; docs/design.md §3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.linear_attention import ACTIVATIONS, LinearAttentionMixer, fixed_decay_log
from gla_jax.layers.sharding import mesh_axes
from gla_jax.ops import gla as gla_op
from gla_jax.ops import registry

GATES = ("gla", "scalar", "fixed", "none")
_FEATURE_MAPS = {
    **ACTIVATIONS,
    "logsigmoid": jax.nn.log_sigmoid,
    "sqrelu": lambda x: jnp.square(jax.nn.relu(x)),
}


class GatedLinearAttention(LinearAttentionMixer):
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
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
        registry.check_impl(impl)
        if feature_map is not None and feature_map not in _FEATURE_MAPS:
            raise ValueError(f"feature_map: expected None or one of {sorted(_FEATURE_MAPS)}, got {feature_map!r}")
        self._init_heads(hidden_size, expand_k, expand_v, num_heads, num_kv_heads)
        self.key_dim_per_group = self.key_dim // self.num_kv_groups
        self.value_dim_per_group = self.value_dim // self.num_kv_groups
        self.feature_map = feature_map
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.clamp_min = None if clamp_min is None else float(clamp_min)
        self.gate = gate
        self.impl = impl
        linear = self._init_projections(use_output_gate=use_output_gate, use_short_conv=use_short_conv,
                                        conv_size=conv_size, conv_bias=conv_bias, chunk_size=chunk_size,
                                        initializer_range=initializer_range, dtype=dtype, param_dtype=param_dtype,
                                        rngs=rngs)
        if gate in ("gla", "scalar"):
            gk_out = self.key_dim_per_group if gate == "gla" else self.num_kv_heads
            self.gk_proj_0 = linear(self.hidden_size, int(gate_low_rank_dim), ("embed", None))
            self.gk_proj_1 = linear(int(gate_low_rank_dim), gk_out, (None, "kv"), bias=True)
        else:
            self.gk_proj_0 = self.gk_proj_1 = None
        self._init_output(linear, gate_fn=gate_fn, norm_eps=norm_eps, elementwise_affine=elementwise_affine,
                          param_dtype=param_dtype)

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
        return {"recurrent": s, "conv": self._zero_conv_cache(batch_size)}

    def __call__(self, x, *, segment_ids=None, cache=None, return_cache: bool = False, impl: str | None = None):
        """x: [B, T, D]; segment_ids: [B, T] int (packed documents); cache: a dict from :meth:`init_cache` or a
        previous call (state before x; it belongs to the first document). Returns y [B, T, D], or (y, new_cache)
        with ``return_cache``. ``impl`` overrides the layer's operator form for this call."""
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, {self.hidden_size}], got shape {x.shape}")
        impl = self.impl if impl is None else impl
        x = x.astype(self.dtype)
        q, k, v, conv_cache = self._project_qkv(x, segment_ids, cache, return_cache)
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
        y = self._gated_output(o, x)
        if return_cache:
            return y, {"recurrent": new_state, "conv": conv_cache}
        return y
