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
