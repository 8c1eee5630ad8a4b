"""Tile sizes of the Mosaic GPU GLA kernels and the SMEM layout of their wgmma operands.

wgmma (Hopper's warpgroup matrix multiply) reads its operands from SMEM in 8-row tiles whose rows are one
128-byte swizzle line: 64 elements of a 16-bit type. Every SMEM operand therefore has a minor dimension that is a
multiple of 64, which fixes the chunk (C = 64: the [C, C] intra-chunk matrix is one [64, 64] tile and one
warpgroup's wgmma M), the V slice of a block (64) and the padding of K and V (multiples of 64).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

F32 = jnp.float32
#: Chunk length: one wgmma M tile (64 rows per warpgroup) and one 128-byte swizzle line of bf16/fp16.
CHUNK = 64
#: Width of the V slice one block owns (its accumulators are [64, 64] / [K, 64] float32).
BLOCK_V = 64
#: Bytes of one swizzle line (the widest swizzle wgmma supports).
SWIZZLE = 128


def padded_width(n: int) -> int:
    """K or V after padding: a multiple of 64 (one swizzle line of a 16-bit type)."""
    return -(-int(n) // 64) * 64


def smem_transforms(dtype, swizzle: int = SWIZZLE):
    """(tiling, swizzle) transforms of a 16-bit wgmma operand in SMEM: [8, swizzle / itemsize] tiles, swizzled."""
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


#: Shared memory one block may use on sm_90 (H100/H200): 227 KiB, the limit Mosaic GPU checks when lowering.
SMEM_LIMIT_BYTES = 227 * 1024
#: Bytes Mosaic reserves per mbarrier.
_BARRIER_BYTES = 8


def smem_bytes(kernel: str, K: int, dtype, *, stages: int = 2, out_dtype=None) -> int:
    """Shared memory of one block of ``kernel`` ("states" or "products") at padded head width K (the V slice is
    always 64 wide), operand dtype ``dtype``; ``out_dtype`` (products only) defaults to ``dtype``. Matches what
    Mosaic GPU allocates (buffers plus barriers), up to the alignment of the barriers."""
    isz = jnp.dtype(dtype).itemsize
    C, BV = CHUNK, BLOCK_V
    if kernel == "states":
        state = K * BV * 4  # float32 running state (initial/final state staging; the state itself in staged mode)
        out = 2 * K * BV * isz  # two slots for the chunk-start states going out by TMA
        pipe = stages * (K * C * isz + C * BV * isz + K * 4)  # xt, y and the decay per slot
        return state + out + pipe + (1 + stages) * _BARRIER_BYTES
    if kernel == "products":
        osz = jnp.dtype(out_dtype or dtype).itemsize
        resident = C * C * isz + C * K * isz  # P and Q tiles, loaded once per block
        out = 2 * C * BV * osz
        pipe = stages * (C * BV * isz + K * BV * isz)  # Y and S slices
        return resident + out + pipe + (1 + stages) * _BARRIER_BYTES
    raise ValueError(f"kernel: expected 'states' or 'products', got {kernel!r}")


def check_smem(K: int, dtype) -> dict[str, int]:
    """SMEM of every kernel at padded head width K (products with a float32 output, as dv uses); a one-line
    ValueError naming ``q`` when one is over ``SMEM_LIMIT_BYTES``. Returns {kernel: bytes}."""
    out = {"states": smem_bytes("states", K, dtype), "products": smem_bytes("products", K, dtype, out_dtype=F32)}
    for kernel, n in out.items():
        if n > SMEM_LIMIT_BYTES:
            raise ValueError(f"q: head dim {K} (padded) needs {n / 1024:.0f} KiB of shared memory in the {kernel} "
                             f"kernel, over the {SMEM_LIMIT_BYTES // 1024} KiB of sm_90; the Mosaic GPU kernels "
                             "take K <= 256")
    return out
