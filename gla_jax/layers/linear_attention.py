"""What the linear-attention token mixers (GLA, multi-scale retention) share: head sizes, the q/k/v/output-gate
projections with their optional short convolutions, and the output path (per-head RMSNorm, output gate, o_proj).

fla's layers have one layout for all of them (docs/design.md §3): key width ``Dk = D·expand_k`` and value width
``Dv = D·expand_v`` over ``num_heads`` heads; with ``num_kv_heads`` < heads the k/v projections (and convs) have
``Dk/G`` and ``Dv/G`` features (G = heads / kv heads), each kv head serving consecutive query heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.conv import ShortConvolution
from gla_jax.layers.linear import linear_factory
from gla_jax.layers.norm import RMSNorm, rms_norm

#: Activations by fla's names: output gates of both layers, feature maps of retention (GLA adds two more).
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def fixed_decay_log(num_heads: int):
    """RetNet's per-head constant log decay ``log(1 - 2^(-5-h))``, h = 0..H-1 ([H] float32)."""
    h = jnp.arange(num_heads, dtype=jnp.float32)
    return jnp.log1p(-jnp.exp2(-5.0 - h))


def exact_dim(hidden_size: int, expand: float, name: str) -> int:
    """``hidden_size * expand`` as a positive int; a one-line ValueError naming ``name`` when it is not one."""
    dim = hidden_size * expand
    if not math.isclose(dim, round(dim)) or round(dim) < 1:
        raise ValueError(f"{name}: hidden_size * {name} must be a positive integer, got {dim}")
    return int(round(dim))


class LinearAttentionMixer(nnx.Module):
    """Base of the GLA and retention layers: the ``_init_*`` methods set the shared attributes and parameters (in a
    fixed order, so a seed gives the same weights), the others are the shared steps of a call."""

    def _init_heads(self, hidden_size: int, expand_k: float, expand_v: float, num_heads: int,
                    num_kv_heads: int | None):
        """Sets hidden_size, num_heads, num_kv_heads, num_kv_groups, key_dim, value_dim, head_k_dim, head_v_dim."""
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
        self.hidden_size = int(hidden_size)
        self.num_heads, self.num_kv_heads = int(num_heads), int(num_kv_heads)
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.key_dim = exact_dim(hidden_size, expand_k, "expand_k")
        self.value_dim = exact_dim(hidden_size, expand_v, "expand_v")
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(f"num_heads: expected a divisor of the key dim {self.key_dim} and value dim "
                             f"{self.value_dim}, got {num_heads}")
        self.head_k_dim = self.key_dim // self.num_heads
        self.head_v_dim = self.value_dim // self.num_heads

    def _init_projections(self, *, use_output_gate: bool, use_short_conv: bool, conv_size: int, conv_bias: bool,
                          chunk_size: int, initializer_range: float, dtype, param_dtype, rngs: nnx.Rngs):
        """Sets ``q_proj [D, Dk]``, ``k_proj [D, Dk/G]``, ``v_proj [D, Dv/G]``, ``g_proj [D, Dv]`` (None without
        ``use_output_gate``) and the SiLU short convs ``q/k/v_conv1d`` (None without ``use_short_conv``); also
        use_output_gate, use_short_conv, conv_size, chunk_size and dtype (the compute dtype). Returns the layer's
        ``linear`` (``linear.linear_factory``) for the projections that come after these."""
        linear = linear_factory(initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.chunk_size = int(chunk_size)
        self.dtype = dtype
        self.use_output_gate = bool(use_output_gate)
        self.use_short_conv = bool(use_short_conv)
        self.conv_size = int(conv_size)
        D, G = self.hidden_size, self.num_kv_groups
        self.q_proj = linear(D, self.key_dim, ("embed", "heads"))
        self.k_proj = linear(D, self.key_dim // G, ("embed", "kv"))
        self.v_proj = linear(D, self.value_dim // G, ("embed", "kv"))
        self.g_proj = linear(D, self.value_dim, ("embed", "heads")) if self.use_output_gate else None
        if self.use_short_conv:
            ckw = dict(bias=conv_bias, activation="silu", initializer_range=initializer_range, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, axis_name="heads", **ckw)
            self.k_conv1d = ShortConvolution(self.key_dim // G, conv_size, axis_name="kv", **ckw)
            self.v_conv1d = ShortConvolution(self.value_dim // G, conv_size, axis_name="kv", **ckw)
        else:
            self.q_conv1d = self.k_conv1d = self.v_conv1d = None
        return linear

    def _init_output(self, linear, *, gate_fn: str, norm_eps: float, elementwise_affine: bool, param_dtype):
        """Sets ``o_proj [Dv, D]`` and ``g_norm`` (per-head RMSNorm over Dv/H, float32, weight with
        ``elementwise_affine``), and gate_fn."""
        if gate_fn not in ACTIVATIONS:
            raise ValueError(f"gate_fn: expected one of {sorted(ACTIVATIONS)}, got {gate_fn!r}")
        self.gate_fn = gate_fn
        self.o_proj = linear(self.value_dim, self.hidden_size, ("heads", "embed"))
        self.g_norm = RMSNorm(self.head_v_dim, eps=norm_eps, elementwise_affine=bool(elementwise_affine),
                              dtype=jnp.float32, param_dtype=param_dtype)

    def _zero_conv_cache(self, batch_size: int):
        """The short convs' zero decoding cache: (q, k, v) tails [B, W-1, channels] in ``dtype``, or None."""
        if not self.use_short_conv:
            return None
        G, W = self.num_kv_groups, self.conv_size - 1
        return tuple(jnp.zeros((batch_size, W, c), self.dtype)
                     for c in (self.key_dim, self.key_dim // G, self.value_dim // G))

    def _project_qkv(self, x, segment_ids, cache, return_cache: bool):
        """x [B, T, D] -> (q [B, T, Dk], k [B, T, Dk/G], v [B, T, Dv/G], conv cache or None): the projections and,
        with ``use_short_conv``, the short convs (continuing ``cache["conv"]`` when there is one)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if not self.use_short_conv:
            return q, k, v, None
        cq, ck, cv = cache["conv"] if cache is not None and cache.get("conv") is not None else (None,) * 3
        q, cq = self.q_conv1d(q, segment_ids=segment_ids, cache=cq, output_final_state=return_cache)
        k, ck = self.k_conv1d(k, segment_ids=segment_ids, cache=ck, output_final_state=return_cache)
        v, cv = self.v_conv1d(v, segment_ids=segment_ids, cache=cv, output_final_state=return_cache)
        return q, k, v, (cq, ck, cv)

    def _gated_output(self, o, x):
        """o [B, T, H, Dv/H] (the operator's output), x [B, T, D] -> y [B, T, D] in ``dtype``:
        ``o_proj(rms_norm(o per head) ⊙ w ⊙ gate_fn(g_proj(x)))`` (no gate factor without ``use_output_gate``)."""
        B, T = x.shape[:2]
        w = self.g_norm.weight[...] if self.g_norm.weight is not None else None
        o = rms_norm(o, w, self.g_norm.eps).reshape(B, T, self.value_dim)  # float32
        if self.use_output_gate:
            o = o * ACTIVATIONS[self.gate_fn](self.g_proj(x).astype(jnp.float32))
        return self.o_proj(o.astype(self.dtype))
