"""Forward Mosaic TPU kernels of chunkwise GLA: the fused forward (state carried in VMEM, intra-chunk attention,
output) and the state pass that the backward uses to recompute chunk-start states.

Inputs are padded and laid out by ``chunk_gla.py``: q, k [B, T, H·K] and v [B, T, H·V] in the matmul dtype, gc
[B, T, H·K] float32 chunk-local cumulative gates, zc [B, T, H·K] float32 chunk-local cumulative zero-gate steps
(``blocks.gap``), decay [B, NT, H·K, 1] float32 (e^{gate sum of the chunk}, zeroed
where a document starts inside the chunk), h0 [B, H, K, V] float32, optional document codes relc [B, T, 1] and
relr [B, 1, T] int32. T is a multiple of the chunk C and K, V multiples of 128, so a head's [C, K] slab is the
block (b, chunk n, head h) of the [B, T, H·K] array: no transposes around the kernels.

Grid (B, H, NT): batch and heads "parallel" (split across the TensorCores of a megacore chip), chunks "arbitrary"
(sequential, in order), the running state a float32 [K, V] VMEM scratch initialised at the first chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .blocks import F32, doc_masks, dot, gap, intra_attention, iota
from .tiling import Tiling

SQ = getattr(pl, "squeezed", None)  # a block dimension of size one that the kernel does not see


def compiler_params():
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return cls(dimension_semantics=("parallel", "parallel", "arbitrary"))


def chunk_specs(C, K, V, NT, *, reverse=False):
    """BlockSpecs over the grid (b, h, n) for the per-chunk inputs; ``reverse`` walks the chunks last to first."""
    chunk = (lambda n: NT - 1 - n) if reverse else (lambda n: n)
    return dict(
        k=pl.BlockSpec((SQ, C, K), lambda b, h, n: (b, chunk(n), h)),
        v=pl.BlockSpec((SQ, C, V), lambda b, h, n: (b, chunk(n), h)),
        decay=pl.BlockSpec((SQ, SQ, K, 1), lambda b, h, n: (b, chunk(n), h, 0)),
        state=pl.BlockSpec((SQ, SQ, K, V), lambda b, h, n: (b, h, 0, 0)),
        states=pl.BlockSpec((SQ, SQ, SQ, K, V), lambda b, h, n: (b, chunk(n), h, 0, 0)),
        relc=pl.BlockSpec((SQ, C, 1), lambda b, h, n: (b, chunk(n), 0)),
        relr=pl.BlockSpec((SQ, 1, C), lambda b, h, n: (b, 0, chunk(n))),
    )


# ----------------------------------------------------------------------------------------------------- kernels


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, z_ref, decay_ref, h0_ref, *rest, NT, scale, c, dt, has_seg):
    """One chunk of one (b, h): o = A v + (scale q ⊙ e^{g}) S, then S <- diag(decay) S + (k ⊙ e^{g_C - g})ᵀ v."""
    if has_seg:
        relc_ref, relr_ref, o_ref, ht_ref, s_scr, a_scr = rest
    else:
        o_ref, ht_ref, s_scr, a_scr = rest
    C = g_ref.shape[0]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = h0_ref[...]

    mask = iota((C, C), 1) <= iota((C, C), 0)
    if has_seg:
        same, first, last, _ = doc_masks(relc_ref, relr_ref, C)
        mask = mask & same
    intra_attention(q_ref, k_ref, g_ref, z_ref, a_scr, c=c, dt=dt)
    a = jnp.where(mask, a_scr[...], 0.0) * scale
    g, z = g_ref[...], z_ref[...]
    s = s_scr[...]
    qe = q_ref[...].astype(F32) * (jnp.exp(g + z) * scale)  # exponents <= 0
    ke = k_ref[...].astype(F32) * jnp.exp(gap(g[C - 1:C, :], z[C - 1:C, :], g, z))
    if has_seg:
        qe = jnp.where(first, qe, 0.0)  # only the chunk's first document sees the incoming state
        ke = jnp.where(last, ke, 0.0)  # only its last document reaches the next chunk
    v = v_ref[...]
    o_ref[...] = (dot(a, v, dt=dt) + dot(qe, s, dt=dt)).astype(o_ref.dtype)
    s_scr[...] = s * decay_ref[...] + dot(ke.T, v, dt=dt)

    @pl.when(n == NT - 1)
    def _():
        ht_ref[...] = s_scr[...]


def _states_kernel(k_ref, v_ref, g_ref, z_ref, decay_ref, h0_ref, *rest, NT, dt, has_seg):
    """One chunk of one (b, h): store the state entering the chunk (``dt``), then advance it."""
    if has_seg:
        relc_ref, relr_ref, hs_ref, s_scr = rest
    else:
        hs_ref, s_scr = rest
    C = g_ref.shape[0]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = h0_ref[...]

    s = s_scr[...]
    hs_ref[...] = s.astype(hs_ref.dtype)
    g, z = g_ref[...], z_ref[...]
    ke = k_ref[...].astype(F32) * jnp.exp(gap(g[C - 1:C, :], z[C - 1:C, :], g, z))
    if has_seg:
        _, _, last, _ = doc_masks(relc_ref, relr_ref, C)
        ke = jnp.where(last, ke, 0.0)
    s_scr[...] = s * decay_ref[...] + dot(ke.T, v_ref[...], dt=dt)


# ----------------------------------------------------------------------------------------------------- launchers


def launch_geometry(x, v, *, H, tiling: Tiling, reverse=False):
    """(B, K, V, C, NT, specs) of a launch: x [B, T, H·K], v [B, T, H·V], C the chunk length of ``tiling``, NT = T / C
    chunks and ``specs`` from :func:`chunk_specs` (``reverse``: the grid walks the chunks last to first)."""
    B, T, HK = x.shape
    K, V = HK // H, v.shape[-1] // H
    C = tiling.chunk_size
    NT = T // C
    return B, K, V, C, NT, chunk_specs(C, K, V, NT, reverse=reverse)


def launch(kernel, args, seg, specs, *, in_specs, grid, interpret, name, **call_kwargs):
    """``pl.pallas_call`` of ``kernel`` (given ``has_seg``) on ``args`` and the document codes ``seg`` (None or
    (relc, relr), their block specs appended to ``in_specs``), with the grid semantics of :func:`compiler_params`;
    ``call_kwargs``: out_specs, out_shape, scratch_shapes."""
    if seg is not None:
        in_specs, args = [*in_specs, specs["relc"], specs["relr"]], [*args, *seg]
    return pl.pallas_call(functools.partial(kernel, has_seg=seg is not None), grid=grid, in_specs=in_specs,
                          compiler_params=compiler_params(), interpret=interpret, name=name, **call_kwargs)(*args)


def forward(q, k, v, gc, zc, decay, h0, seg, *, H, scale: float, tiling: Tiling, interpret):
    """o [B, T, H·V] (v's dtype) and the final state [B, H, K, V] float32. ``seg`` is None or (relc, relr)."""
    B, K, V, C, NT, sp = launch_geometry(q, v, H=H, tiling=tiling)
    return launch(
        functools.partial(_forward_kernel, NT=NT, scale=scale, c=tiling.sub_chunk, dt=q.dtype),
        (q, k, v, gc, zc, decay, h0), seg, sp,
        in_specs=[sp["k"], sp["k"], sp["v"], sp["k"], sp["k"], sp["decay"], sp["state"]],
        grid=(B, H, NT),
        out_specs=[sp["v"], sp["state"]],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((B, H, K, V), F32)],
        scratch_shapes=[pltpu.VMEM((K, V), F32), pltpu.VMEM((C, C), F32)],
        interpret=interpret,
        name="gla_tpu_fwd",
    )


def chunk_states(k, v, gc, zc, decay, h0, seg, *, H, tiling: Tiling, interpret):
    """States entering every chunk, hs [B, NT, H, K, V] in k's dtype."""
    B, K, V, C, NT, sp = launch_geometry(k, v, H=H, tiling=tiling)
    return launch(
        functools.partial(_states_kernel, NT=NT, dt=k.dtype),
        (k, v, gc, zc, decay, h0), seg, sp,
        in_specs=[sp["k"], sp["v"], sp["k"], sp["k"], sp["decay"], sp["state"]],
        grid=(B, H, NT),
        out_specs=sp["states"],
        out_shape=jax.ShapeDtypeStruct((B, NT, H, K, V), k.dtype),
        scratch_shapes=[pltpu.VMEM((K, V), F32)],
        interpret=interpret,
        name="gla_tpu_states",
    )
