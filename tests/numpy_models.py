"""Independent float64 numpy forms of the model math (RMSNorm, SwiGLU, short conv, the GLA layer, softmax attention
with RoPE, and whole models), read straight from the parameters. Written apart from the library for its tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx



def gla_recurrence(q, k, v, g, seg=None):
    """o_t = (q_t / sqrt(K)) S_t,  S_t = diag(exp g_t) S_{t-1} + k_tᵀ v_t, state reset at document starts."""
    B, T, H, K = q.shape
    o = np.zeros(v.shape)
    for b in range(B):
        S = np.zeros((H, K, v.shape[-1]))
        for t in range(T):
            if seg is not None and t > 0 and seg[b, t] != seg[b, t - 1]:
                S = np.zeros_like(S)
            S = S * np.exp(g[b, t])[:, :, None] + k[b, t][:, :, None] * v[b, t][:, None, :]
            o[b, t] = np.einsum("hk,hkv->hv", q[b, t] * K ** -0.5, S)
    return o


def P(x):
    return np.asarray(x[...] if hasattr(x, "get_value") or hasattr(x, "value") else x, np.float64)


def silu(x):
    return x / (1.0 + np.exp(-x))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def rmsnorm(x, w, eps):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w


def linear(lin, x):
    y = x @ P(lin.kernel)
    if getattr(lin, "bias", None) is not None:
        y = y + P(lin.bias)
    return y


def mlp(m, x):
    return linear(m.down_proj, silu(linear(m.gate_proj, x)) * linear(m.up_proj, x))


def short_conv(conv, x, seg=None):
    """Causal depthwise conv, one document at a time when seg is given (x: [B, T, C])."""
    w = P(conv.weight)  # [C, W]
    C, W = w.shape
    B, T, _ = x.shape
    y = np.zeros_like(x)
    for b in range(B):
        for t in range(T):
            acc = np.zeros(C)
            for i in range(W):
                s = t - (W - 1) + i
                if s < 0 or (seg is not None and seg[b, s] != seg[b, t]):
                    continue
                acc += w[:, i] * x[b, s]
            y[b, t] = acc
    if conv.bias is not None:
        y = y + P(conv.bias)
    return silu(y)


FEATURE_MAPS = {None: lambda x: x, "relu": lambda x: np.maximum(x, 0), "swish": silu, "silu": silu,
                "sigmoid": lambda x: 1 / (1 + np.exp(-x))}


def gla_layer(a, x, seg=None):
    """The GatedLinearAttention math in float64 from a layer's parameters. x: [B, T, D]."""
    B, T, _ = x.shape
    H, Hkv = a.num_heads, a.num_kv_heads
    Dk, Dv = a.key_dim // H, a.value_dim // H
    q, k, v = linear(a.q_proj, x), linear(a.k_proj, x), linear(a.v_proj, x)
    if a.use_short_conv:
        q, k, v = short_conv(a.q_conv1d, q, seg), short_conv(a.k_conv1d, k, seg), short_conv(a.v_conv1d, v, seg)
    rep = H // Hkv  # kv head j serves query heads j*rep .. j*rep+rep-1
    q = q.reshape(B, T, H, Dk)
    k = np.repeat(k.reshape(B, T, Hkv, Dk), rep, axis=2)
    v = np.repeat(v.reshape(B, T, Hkv, Dv), rep, axis=2)
    if a.gate == "gla":
        g = log_sigmoid(linear(a.gk_proj_1, linear(a.gk_proj_0, x))) / a.gate_logit_normalizer
        g = np.repeat(g.reshape(B, T, Hkv, Dk), rep, axis=2)
    elif a.gate == "scalar":
        g = log_sigmoid(linear(a.gk_proj_1, linear(a.gk_proj_0, x))) / a.gate_logit_normalizer  # [B, T, Hkv]
        g = np.broadcast_to(np.repeat(g, rep, axis=2)[..., None], (B, T, H, Dk))
    elif a.gate == "fixed":
        g = np.broadcast_to(np.log(1 - 2.0 ** (-5.0 - np.arange(H)))[None, None, :, None], (B, T, H, Dk))
    else:
        g = np.zeros((B, T, H, Dk))
    if a.clamp_min is not None:
        g = np.maximum(g, a.clamp_min)
    fm = FEATURE_MAPS[a.feature_map]
    q, k = fm(q), fm(k)
    o = gla_recurrence(q, k, v, g, seg)
    w = None if a.g_norm.weight is None else P(a.g_norm.weight)
    o = rmsnorm(o, w, a.g_norm.eps).reshape(B, T, H * Dv)
    if a.use_output_gate:
        o = o * silu(linear(a.g_proj, x))
    return linear(a.o_proj, o)


def rope(x, pos, theta):
    """x: [B, T, H, D], rotating halves (x1, x2) by angle pos * theta^(-2i/D)."""
    D = x.shape[-1]
    inv = theta ** (-np.arange(0, D, 2) / D)
    ang = pos[:, :, None, None] * inv  # [B, T, 1, D/2]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def attention_layer(a, x, seg=None):
    B, T, _ = x.shape
    H, Hkv, Dh = a.num_heads, a.num_kv_heads, a.head_dim
    q = linear(a.q_proj, x).reshape(B, T, H, Dh)
    k = linear(a.k_proj, x).reshape(B, T, Hkv, Dh)
    v = linear(a.v_proj, x).reshape(B, T, Hkv, Dh)
    if a.q_norm is not None:
        q, k = rmsnorm(q, P(a.q_norm.weight), a.q_norm.eps), rmsnorm(k, P(a.k_norm.weight), a.k_norm.eps)
    pos = np.broadcast_to(np.arange(T, dtype=np.float64), (B, T))
    q, k = rope(q, pos, a.rope_theta), rope(k, pos, a.rope_theta)
    k, v = np.repeat(k, H // Hkv, axis=2), np.repeat(v, H // Hkv, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(Dh)
    mask = np.tril(np.ones((T, T), bool))[None]
    if seg is not None:
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * Dh)
    return linear(a.o_proj, o)


def causal_lm(model, ids, seg=None):
    """Whole-model float64 logits [B, T, vocab] for GLAForCausalLM / TransformerForCausalLM."""
    m = model.model
    E = P(m.embeddings.embedding)
    x = E[np.asarray(ids)]
    for blk in (m.layer(i) for i in range(m.num_layers)):  # per-layer views of the stacked parameters
        h = rmsnorm(x, P(blk.attn_norm.weight), blk.attn_norm.eps)
        mixer = gla_layer if hasattr(blk.attn, "gate") else attention_layer
        x = x + mixer(blk.attn, h, seg)
        h = rmsnorm(x, P(blk.mlp_norm.weight), blk.mlp_norm.eps)
        x = x + mlp(blk.mlp, h)
    x = rmsnorm(x, P(m.norm.weight), m.norm.eps)
    return x @ E.T if model.lm_head is None else x @ P(model.lm_head.kernel)


def random_params(module, seed=1, scale=0.2):
    """Fills every parameter with random values (norm weights around 1, biases around 0) so nothing is trivially
    exact; works on abstract modules from nnx.eval_shape (no initializer compilation)."""
    rs = np.random.RandomState(seed)
    for path, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            r = rs.standard_normal(var.shape).astype(np.float32)
            name = str(path[-1])
            stacked = "layers" in map(str, path)  # a leading [L] layer axis
            is_norm = name == "weight" and len(var.shape) - stacked == 1
            var.set_value(jnp.asarray(1.0 + 0.3 * r if is_norm else (0.3 if name in ("bias", "weight") else scale) * r))
    return module


def build(ctor, seed=1, scale=0.2):
    """An abstract module (nnx.eval_shape) with random concrete parameters."""
    return random_params(nnx.eval_shape(ctor), seed, scale)
