"""Softmax attention with RoPE and grouped kv heads (the Transformer++ token mixer), via
``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU when no explicit mask is needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.linear import linear_factory
from gla_jax.layers.norm import RMSNorm
from gla_jax.layers.rotary import apply_rotary


class Attention(nnx.Module):
    """Causal multi-head attention. ``x: [B, T, D]`` -> ``[B, T, D]``.

    Parameters: ``q_proj [D, D]``, ``k_proj``/``v_proj [D, Hkv·Dh]`` (biases with ``qkv_bias``), ``o_proj [D, D]``,
    with ``qk_norm`` per-head ``q_norm``/``k_norm`` (RMSNorm over Dh, before RoPE).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, *, qkv_bias: bool = False,
                 qk_norm: bool = False, rope_theta: float | None = 10000.0, norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, implementation: str | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads or hidden_size % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size} and be a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.hidden_size = int(hidden_size)
        self.num_heads = int(num_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = self.hidden_size // self.num_heads
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.implementation = implementation
        self.dtype = dtype
        linear = linear_factory(initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = linear(hidden_size, hidden_size, ("embed", "heads"), qkv_bias)
        self.k_proj = linear(hidden_size, kv_dim, ("embed", "kv"), qkv_bias)
        self.v_proj = linear(hidden_size, kv_dim, ("embed", "kv"), qkv_bias)
        self.o_proj = linear(hidden_size, hidden_size, ("heads", "embed"), False)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(self.head_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def init_cache(self, batch_size: int, max_len: int):
        """Empty KV cache for ``max_len`` positions in the compute dtype: 'k' [B, Hkv, Dh, S] and 'v' [B, Hkv, S, Dh]
        (the layouts of plain matmuls q·K and p·V, so a decode step never transposes the cache)."""
        B, Hkv, Dh = batch_size, self.num_kv_heads, self.head_dim
        return {"k": jnp.zeros((B, Hkv, Dh, max_len), self.dtype), "v": jnp.zeros((B, Hkv, max_len, Dh), self.dtype)}

    def __call__(self, x, *, positions=None, segment_ids=None, cache=None, cache_index=None, cache_segments=None):
        """x: [B, T, D]; positions: [B, T] int (RoPE; default arange, or ``cache_index + arange`` with a cache);
        segment_ids: [B, T] int (attention stays inside a document).

        With ``cache`` (from :meth:`init_cache`), the new keys/values are written at slots ``cache_index ..
        cache_index+T-1`` and queries attend to every filled slot j <= their own slot whose entry of
        ``cache_segments`` ([B, S] int, -1 for empty; already updated for the new tokens) equals theirs.
        Returns y [B, T, D], or (y, new_cache) when a cache is given.
        """
        B, T, _ = x.shape
        x = x.astype(self.dtype)
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        if self.rope_theta is not None:
            q = apply_rotary(q, positions, self.rope_theta)
            k = apply_rotary(k, positions, self.rope_theta)
        if cache is None:
            if segment_ids is None:
                o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation)
            else:
                same = segment_ids[:, :, None] == segment_ids[:, None, :]
                causal = jnp.tril(jnp.ones((T, T), bool))
                mask = (same & causal)[:, None]
                o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
            new_cache = None
        else:
            if cache_index is None or cache_segments is None:
                raise ValueError("cache_index and cache_segments are required with cache")
            old_k, old_v = cache["k"], cache["v"]  # [B, Hkv, Dh, S], [B, Hkv, S, Dh]
            S = old_k.shape[3]
            G = self.num_heads // self.num_kv_heads
            scale = self.head_dim ** -0.5
            f32 = jnp.float32
            qg = q.reshape(B, T, self.num_kv_heads, G, self.head_dim).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, Dh]
            kn = k.transpose(0, 2, 1, 3).astype(old_k.dtype)  # [B, Hkv, T, Dh]
            vn = v.transpose(0, 2, 1, 3).astype(old_v.dtype)
            seg_q = jax.lax.dynamic_slice_in_dim(cache_segments, cache_index, T, axis=1)  # [B, T]
            # scores against the slots filled before this call, and among the new tokens (causal); the cache
            # update below then only feeds the returned cache
            s_old = jnp.einsum("bkgtd,bkds->bkgts", qg, old_k, preferred_element_type=f32) * scale
            m_old = ((cache_segments[:, None, :] == seg_q[:, :, None])
                     & (jnp.arange(S)[None, None, :] < cache_index))  # [B, T, S]
            s_new = jnp.einsum("bkgtd,bkud->bkgtu", qg, kn, preferred_element_type=f32) * scale
            m_new = (seg_q[:, :, None] == seg_q[:, None, :]) & jnp.tril(jnp.ones((T, T), bool))[None]
            scores = jnp.concatenate([jnp.where(m_old[:, None, None], s_old, -jnp.inf),
                                      jnp.where(m_new[:, None, None], s_new, -jnp.inf)], axis=-1)
            p = jax.nn.softmax(scores, axis=-1)
            o = (jnp.einsum("bkgts,bksd->bkgtd", p[..., :S].astype(old_v.dtype), old_v, preferred_element_type=f32)
                 + jnp.einsum("bkgtu,bkud->bkgtd", p[..., S:].astype(vn.dtype), vn, preferred_element_type=f32))
            o = o.transpose(0, 3, 1, 2, 4).reshape(B, T, self.num_heads, self.head_dim).astype(self.dtype)
            ck = jax.lax.dynamic_update_slice(old_k, kn.transpose(0, 1, 3, 2), (0, 0, 0, cache_index))
            cv = jax.lax.dynamic_update_slice(old_v, vn, (0, 0, cache_index, 0))
            new_cache = {"k": ck, "v": cv}
        y = self.o_proj(o.reshape(B, T, self.hidden_size))
        return y if cache is None else (y, new_cache)
