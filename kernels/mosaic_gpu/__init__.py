"""Pallas Mosaic GPU kernels for chunkwise GLA on Hopper (``gla_jax.kernels.mosaic_gpu``). Needs only jax.

``chunk_gla`` is the entry (forward and ``custom_vjp`` backward), with the operator's kernel contract. Same math as
the other backends (docs/design.md §1-2): chunks of C = 64, sub-chunks of 16, float32 gates and states, every
exponent <= 0, the per-chunk dg identity. Written for sm_90a (H100/H200): ``plgpu.kernel`` with TMA copies,
mbarriers, ``plgpu.emit_pipeline`` and warpgroup matmuls (``plgpu.wgmma``) with float32 accumulators.

What runs where:
  * Mosaic GPU (``states.py``): the sequential state pass, S_{n+1} = diag(a_n) S_n + (k_n ⊙ e^{b_C - b})ᵀ v_n,
    grid (B, H, V / 64), one warpgroup per block walking the chunks with its float32 [K, 64] state in the wgmma
    accumulator registers; the backward's state-gradient pass is the same kernel walking the chunks in reverse
    with (scale q ⊙ e^{b})ᵀ do.
  * Mosaic GPU (``products.py``): out_n = P_n Y_n + Q_n S_n per chunk, grid (B, H, N), fully parallel; it gives the
    output o = (scale A) v + (scale q ⊙ e^{b}) S and the value gradient dv = (scale A)ᵀ do + (k ⊙ e^{b_C - b}) dH.
  * XLA (float32): the gate factors, the masked intra-chunk matrix A (two-level, ``gla_jax.ops.chunk``), the
    layout transposes, and dq, dk, dg (``grads.py``, float32 matmuls).

Why C = 64 and 64-wide V slices: wgmma's M is 64 per warpgroup and a 16-bit SMEM operand's minor dimension is one
128-byte swizzle line = 64 elements (``tiles.py``); K and V are padded to multiples of 64. Inputs must be bfloat16
or float16 (wgmma operand types; float32 is refused with a pointer to the Triton kernels), K <= 256 (the state
pass's SMEM: 210 KiB of 227 KiB at K = 256, ``tiles.smem_bytes``).

Verified without a GPU (tests/test_mosaic_gpu.py): Mosaic GPU interpret mode (race detection on, uninitialised
memory NaN) against the float64 recurrence, and lowering for CUDA on the CPU, which runs Mosaic GPU's own passes
down to NVVM. The interpreter has no rules yet for register accumulators (``pl.run_state``/``plgpu.ACC.init``) or
``plgpu.load`` with a layout, so in interpret mode the state pass keeps its state in SMEM (``staged=True``); the
register path is what the lowering tests check. PTX assembly (register allocation, spills) happens only on a GPU.
"""

from .chunk_gla import chunk_gla

__all__ = ["chunk_gla"]
