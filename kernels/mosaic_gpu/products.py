"""The per-chunk output products of chunkwise GLA as a Mosaic GPU kernel: out_n = P_n Y_n + Q_n S_n.

Forward output and the value gradient have this one shape (docs/design.md §7.2):

    o_n  = (scale A_n) v_n  + (scale q_n ⊙ e^{b}) S_n        P = masked intra-chunk matrix, S = chunk-start state
    dv_n = (scale A_n)ᵀ do_n + (k_n ⊙ e^{b_C - b}) dH_n       P = its transpose, S = gradient of the leaving state

Inputs (matmul dtype, prepared by ``chunk_gla.py``): p [B, H, N, C, C], y [B, H, N, C, V], q [B, H, N, C, K],
s [B, H, N, K, V]; C = 64, K and V multiples of 64. Chunks are independent, so the grid is (B, H, N), fully
parallel. A block loads its [64, 64] P tile and [64, K] Q tile once by TMA, then ``plgpu.emit_pipeline`` streams
the [64, 64] Y and [K, 64] S tiles of each 64-wide V slice (two slots: the next slice's TMA overlaps this one's
wgmmas); per slice two wgmmas accumulate into one float32 [64, 64] accumulator, which goes back to HBM by TMA from
one of two SMEM slots. SMEM at K=256: P 8 + Q 32 + 2 x (Y 8 + S 32) + 2 x out 8 = 136 KiB (152 KiB for dv,
whose output slots are float32).
"""

from __future__ import annotations

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import compat
from .tiles import BLOCK_V, CHUNK, F32, smem_transforms

#: Pipeline depth over the V slices.
STAGES = 2


def chunk_products(p, y, q, s, *, out_dtype, interpret):
    """-> out [B, H, N, C, V] in ``out_dtype``: out_n = p_n y_n + q_n s_n with float32 accumulation."""
    B, H, N, C, _ = p.shape
    K, V = q.shape[-1], y.shape[-1]
    if C != CHUNK or K % 64 or V % BLOCK_V:
        raise ValueError(f"chunk_products: expected C={CHUNK} and K, V multiples of 64, got C={C}, K={K}, V={V}")
    dt = y.dtype
    tr = smem_transforms(dt)
    tr_out = smem_transforms(out_dtype)

    def body(p_ref, y_ref, q_ref, s_ref, out_ref, p_smem, q_smem, o_smem, bar):
        b, h, n = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("n")
        plgpu.copy_gmem_to_smem(p_ref.at[b, h, n], p_smem, bar)
        plgpu.copy_gmem_to_smem(q_ref.at[b, h, n], q_smem, bar)
        plgpu.barrier_wait(bar)

        def step(idx, y_s, s_s):
            (j,) = idx

            def products(acc):
                plgpu.wgmma(acc, p_smem, y_s)
                plgpu.wgmma(acc, q_smem, s_s)
                return acc[...]

            out = pl.run_scoped(products, plgpu.ACC((C, BLOCK_V), F32))
            slot = j % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store from this slot two slices ago is done
            o_smem[slot] = out.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[slot], out_ref.at[b, h, n, :, pl.ds(j * BLOCK_V, BLOCK_V)])

        plgpu.emit_pipeline(
            step, grid=(V // BLOCK_V,), max_concurrent_steps=STAGES,
            in_specs=[plgpu.BlockSpec((C, BLOCK_V), lambda j: (0, j), transforms=tr),
                      plgpu.BlockSpec((K, BLOCK_V), lambda j: (0, j), transforms=tr)],
        )(y_ref.at[b, h, n], s_ref.at[b, h, n])
        plgpu.wait_smem_to_gmem(0)

    f = compat.kernel(
        body,
        out=jax.ShapeDtypeStruct((B, H, N, C, V), out_dtype),
        scratch=(plgpu.SMEM((C, C), dt, transforms=tr), plgpu.SMEM((C, K), dt, transforms=tr),
                 plgpu.SMEM((2, C, BLOCK_V), out_dtype, transforms=tr_out), plgpu.Barrier(num_arrivals=2)),
        grid=(B, H, N), grid_names=("b", "h", "n"),
        interpret=compat.interpret_params(interpret),
    )
    return f(p, y, q, s)
