"""The sequential state pass of chunkwise GLA as a Mosaic GPU kernel (forward states and backward state gradients).

One recurrence serves both directions (docs/design.md §7.2):

    forward:   S_{n+1} = diag(a_n) S_n + (k_n ⊙ e^{b_C - b})ᵀ v_n        (starts[n] = S_n, the state entering n)
    backward:  dS_n    = diag(a_n) dS_{n+1} + (scale q_n ⊙ e^{b})ᵀ do_n   (walked last chunk to first; starts[n] =
               dS_{n+1}, the gradient of the state leaving chunk n)

with a_n = e^{b_C} (0 where a document starts inside chunk n) the whole-chunk decay. Inputs, prepared by
``chunk_gla.py`` in float32 and cast to the matmul dtype: xt [B, H, N, K, C] (the gated keys or queries, already
transposed so that wgmma's left operand is a plain [K, C] SMEM tile), y [B, H, N, C, V], decay [B, H, N, K]
float32, s0 [B, H, K, V] float32. K and V are multiples of 64 and C = 64.

Grid (B, H, V / 64): one warpgroup per (batch, head, 64-wide V slice) walks the chunks with the float32 [K, 64]
state in registers (the wgmma accumulator: ``pl.run_state`` with ``plgpu.ACC.init``), its rows scaled by the chunk
decay loaded in the accumulator's row layout (``Layout.WGMMA.reduce(1)``), then one wgmma [K, C] x [C, 64] adds
the chunk's contribution. ``plgpu.emit_pipeline`` streams the xt, y and decay tiles through SMEM with TMA
(``max_concurrent_steps`` slots, so the next chunks' loads overlap the current one's wgmma) and writes each
chunk-start state back with TMA from two SMEM slots. SMEM per block at K=256 (bf16): float32 state staging
64 KiB + 2 out slots x 32 KiB + 2 pipeline slots x (32 + 8 + 1) KiB = 210 KiB of the 227 KiB
(``tiles.smem_bytes``; K > 256 does not fit).

``staged=True`` (used in interpret mode, whose interpreter has no rules yet for ``pl.run_state``,
``plgpu.load`` with a layout or an accumulator initialised from registers) keeps the state in an SMEM float32
buffer instead, and adds a zero-initialised wgmma accumulator to it: the same arithmetic, through SMEM.
"""

from __future__ import annotations

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import compat
from .tiles import BLOCK_V, CHUNK, F32, smem_transforms

#: Pipeline depth of the state pass (TMA slots in flight).
STAGES = 2


def state_pass(xt, y, decay, s0, *, reverse: bool, interpret, staged: bool, stages: int = STAGES):
    """-> (starts [B, H, N, K, V] in y's dtype, final [B, H, K, V] float32); see the module docstring.
    ``stages``: TMA slots of the pipeline (SMEM grows by one [K, C] + [C, 64] + [K] set per slot)."""
    B, H, N, K, C = xt.shape
    V = y.shape[-1]
    if C != CHUNK or K % 64 or V % BLOCK_V:
        raise ValueError(f"state_pass: expected C={CHUNK} and K, V multiples of 64, got C={C}, K={K}, V={V}")
    dt = y.dtype
    chunk = (lambda n: N - 1 - n) if reverse else (lambda n: n)
    tr = smem_transforms(dt)

    def body(xt_ref, y_ref, d_ref, s0_ref, starts_ref, final_ref, s_smem, st_smem, bar):
        b, h, j = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
        vs = pl.ds(j * BLOCK_V, BLOCK_V)
        plgpu.copy_gmem_to_smem(s0_ref.at[b, h, :, vs], s_smem, bar)
        plgpu.barrier_wait(bar)

        specs = [
            plgpu.BlockSpec((None, K, C), lambda n: (chunk(n), 0, 0), transforms=tr),
            plgpu.BlockSpec((None, C, BLOCK_V), lambda n: (chunk(n), 0, 0), transforms=tr),
            plgpu.BlockSpec((None, K), lambda n: (chunk(n), 0)),
        ]
        gmem = (xt_ref.at[b, h], y_ref.at[b, h, :, :, vs], d_ref.at[b, h])

        def write_start(n, s):
            """starts[chunk(n)] <- s (matmul dtype) by TMA from one of two SMEM slots: the store issued two
            steps ago from this slot must have finished reading it."""
            slot = n % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            st_smem[slot] = s.astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(st_smem.at[slot], starts_ref.at[b, h, chunk(n), :, vs])

        if staged:
            def step(idx, xt_s, y_s, d_s):
                s = s_smem[...]
                write_start(idx[0], s)
                delta = pl.run_scoped(lambda acc: _wgmma(acc, xt_s, y_s), plgpu.ACC((K, BLOCK_V), F32))
                s_smem[...] = s * lax.broadcast_in_dim(d_s[...], s.shape, [0]) + delta

            plgpu.emit_pipeline(step, grid=(N,), in_specs=specs, max_concurrent_steps=stages)(*gmem)
        else:
            def step(idx, xt_s, y_s, d_s, s):
                write_start(idx[0], s)
                d = plgpu.load(d_s, (), layout=plgpu.Layout.WGMMA.reduce(1))
                s = s * lax.broadcast_in_dim(d, s.shape, [0])
                return pl.run_state(lambda acc: plgpu.wgmma(acc, xt_s, y_s))(plgpu.ACC.init(s))

            s_init = plgpu.load(s_smem, (), layout=plgpu.Layout.WGMMA)
            s = plgpu.emit_pipeline(step, grid=(N,), in_specs=specs, max_concurrent_steps=stages,
                                    init_carry=s_init)(*gmem)
            s_smem[...] = s
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s_smem, final_ref.at[b, h, :, vs])
        plgpu.wait_smem_to_gmem(0)

    f = compat.kernel(
        body,
        out=(jax.ShapeDtypeStruct((B, H, N, K, V), dt), jax.ShapeDtypeStruct((B, H, K, V), F32)),
        scratch=(plgpu.SMEM((K, BLOCK_V), F32, transforms=smem_transforms(F32)),
                 plgpu.SMEM((2, K, BLOCK_V), dt, transforms=tr), plgpu.Barrier(num_arrivals=1)),
        grid=(B, H, V // BLOCK_V), grid_names=("b", "h", "v"),
        interpret=compat.interpret_params(interpret),
    )
    return f(xt, y, decay, s0)


def _wgmma(acc, a, b):
    """acc += a @ b on the tensor cores; returns the accumulator's value (waits for the wgmma)."""
    plgpu.wgmma(acc, a, b)
    return acc[...]
