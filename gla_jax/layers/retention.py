"""Multi-scale retention (RetNet) with the parameters and math of fla's MultiScaleRetention.

    q, k, v = q_proj(x), k_proj(x), v_proj(x)        (optional causal short convs with SiLU on each)
    q, k    = rotary(feature_map(q), feature_map(k))  (per head, rotate-half, base 10000, positions from 0 per document)
    o       = scalar-gate linear attention with the fixed per-head decay  gamma_h = 1 - 2^(-5-h),  scale K^-1/2
    o       = rms_norm(o per head) ⊙ w  ⊙ gate_fn(g_proj(x))   (no gate: rms_norm(o) ⊙ w only)
    out     = o_proj(o)

The decays are data-independent, so the scan is ``gla_scalar`` with g = log(gamma_h) for every step
(docs/design.md §9). fla's fused norm+gate (``g_norm_swish_gate``, swish gate) and unfused ``g_norm`` compute the same
thing; the weight is ``g_norm.weight`` here either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.linear_attention import ACTIVATIONS, LinearAttentionMixer, fixed_decay_log
from gla_jax.layers.rotary import apply_rotary
from gla_jax.ops.scalar import gla_scalar, gla_scalar_step

FEATURE_MAPS = ACTIVATIONS


def positions_in_documents(segment_ids, offset=0):
    """[B, T] int32 position of each token inside its document (0 at each start); ``offset`` ([B] or scalar) is
    added for the first document (the tokens already seen before this call)."""
    B, T = segment_ids.shape
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate([jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    in_first = first == 0
    return t - first + jnp.where(in_first, jnp.asarray(offset, jnp.int32).reshape(-1, 1), 0)


class MultiScaleRetention(LinearAttentionMixer):
    """RetNet token mixer. ``x: [B, T, D]`` -> ``[B, T, D]`` (in ``dtype``).

    Key width ``Dk = D·expand_k``, value width ``Dv = D·expand_v`` over ``num_heads`` heads; ``num_kv_heads`` < heads
    shares each k/v head across consecutive query heads (fla's layout). Parameters: ``q_proj [D, Dk]``,
    ``k_proj [D, Dk/G]``, ``v_proj [D, Dv/G]``, ``g_proj [D, Dv]`` (with ``use_output_gate``), ``o_proj [Dv, D]``
    (no biases), ``g_norm.weight [Dv/H]`` (with ``elementwise_affine``), short convs ``q/k/v_conv1d`` with
    ``use_short_conv``. Decoding cache: ``{"recurrent": [B, H, K, V] float32, "conv": (q, k, v) tails or None,
    "offset": [B] int32 tokens seen}``.
    """

    def __init__(self, hidden_size: int = 1024, expand_k: float = 1.0, expand_v: float = 2.0, num_heads: int = 8,
                 num_kv_heads: int | None = None, feature_map: str | None = None, use_short_conv: bool = False,
                 conv_size: int = 4, conv_bias: bool = False, use_output_gate: bool = True, gate_fn: str = "swish",
                 elementwise_affine: bool = True, norm_eps: float = 1e-5, *, chunk_size: int = 64,
                 rope_theta: float = 10000.0, initializer_range: float = 0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if feature_map is not None and feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected None or one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
        self._init_heads(hidden_size, expand_k, expand_v, num_heads, num_kv_heads)
        if self.head_k_dim % 2:
            raise ValueError(f"expand_k: the head key dim must be even for the rotary embedding, got {self.head_k_dim}")
        self.feature_map = feature_map
        self.rope_theta = float(rope_theta)
        linear = self._init_projections(use_output_gate=use_output_gate, use_short_conv=use_short_conv,
                                        conv_size=conv_size, conv_bias=conv_bias, chunk_size=chunk_size,
                                        initializer_range=initializer_range, dtype=dtype, param_dtype=param_dtype,
                                        rngs=rngs)
        self._init_output(linear, gate_fn=gate_fn, norm_eps=norm_eps, elementwise_affine=elementwise_affine,
                          param_dtype=param_dtype)

    def init_cache(self, batch_size: int):
        """Zero decoding state (see the class docstring)."""
        return {"recurrent": jnp.zeros((batch_size, self.num_heads, self.head_k_dim, self.head_v_dim), jnp.float32),
                "conv": self._zero_conv_cache(batch_size), "offset": jnp.zeros((batch_size,), jnp.int32)}

    def _qkv(self, x, segment_ids, cache, return_cache):
        B, T, _ = x.shape
        q, k, v, conv_cache = self._project_qkv(x, segment_ids, cache, return_cache)
        q = q.reshape(B, T, self.num_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_kv_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_kv_heads, self.head_v_dim)
        if self.feature_map is not None:
            q, k = FEATURE_MAPS[self.feature_map](q), FEATURE_MAPS[self.feature_map](k)
        offset = jnp.zeros((B,), jnp.int32) if cache is None else cache["offset"]
        seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
        pos = positions_in_documents(seg, offset)
        q, k = apply_rotary(q, pos, self.rope_theta), apply_rotary(k, pos, self.rope_theta)
        if self.num_kv_groups > 1:
            k, v = (jnp.repeat(a, self.num_kv_groups, axis=2) for a in (k, v))
        return q, k, v, conv_cache, pos[:, -1] + 1

    def __call__(self, x, *, segment_ids=None, cache=None, return_cache: bool = False):
        """x: [B, T, D]; segment_ids: [B, T] int (packed documents: state, conv taps and rotary positions restart);
        cache: from :meth:`init_cache` or a previous call. Returns y, or (y, new cache) with ``return_cache``."""
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape [B, T, {self.hidden_size}], got {x.shape}")
        x = x.astype(self.dtype)
        q, k, v, conv_cache, offset = self._qkv(x, segment_ids, cache, return_cache)
        B, T = x.shape[:2]
        g = jnp.broadcast_to(fixed_decay_log(self.num_heads), (B, T, self.num_heads))
        o, s = gla_scalar(q, k, v, g, initial_state=None if cache is None else cache["recurrent"],
                          output_final_state=return_cache, segment_ids=segment_ids, chunk_size=self.chunk_size)
        y = self._gated_output(o, x)
        return (y, {"recurrent": s, "conv": conv_cache, "offset": offset}) if return_cache else y

    def step(self, x_t, cache):
        """One decoding step in O(1) state: x_t [B, D] -> (y_t [B, D], new cache)."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.hidden_size:
            raise ValueError(f"x_t: expected shape [B, {self.hidden_size}], got {x_t.shape}")
        x = x_t[:, None].astype(self.dtype)
        q, k, v, conv_cache, offset = self._qkv(x, None, cache, True)
        g = jnp.broadcast_to(fixed_decay_log(self.num_heads), (x.shape[0], self.num_heads))
        o, s = gla_scalar_step(q[:, 0], k[:, 0], v[:, 0], g, cache["recurrent"])
        return self._gated_output(o[:, None], x)[:, 0], {"recurrent": s, "conv": conv_cache, "offset": offset}
