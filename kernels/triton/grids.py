"""The three launch geometries of the Triton GLA kernels, shared by the forward and backward passes.

Every array is in the operator's layout ([B, T, H, D] sequences, [B, H, K, V] states, [B, NT, H, K, V] per-chunk
states) and already padded (``forward.py``). A launcher names, for each input, how it is blocked; the block
shapes, index maps, grid and outputs follow from the geometry:

- ``state_loop``: grid (B, H, K/BK, V/BV); one program walks every chunk of its (batch, head, K tile, V tile)
  (the forward state pass and the backward state-gradient pass).
- ``per_chunk``: grid (B, H, NT); one program per chunk, every input a [C, full width] block, output an [C, C]
  block of a [B, T, H, C] float32 matrix (the intra-chunk attention matrix A and its gradient dA).
- ``per_chunk_v_tile``: grid (B, H, NT, V/BV); one program per (chunk, V tile), output [B, T, H, V] (the output
  o and the value gradient dv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .tiling import SQUEEZED as SQ, Tiling, launch


def state_loop(kernel, args, blocks, *, rel, state_dtype, tiling: Tiling, interpret: bool, name: str, **static):
    """Launches ``kernel`` on grid (B, H, K/BK, V/BV); returns (per-chunk states [B, NT, H, K, V] in
    ``state_dtype``, final state [B, H, K, V] float32).

    blocks: one per arg: ``"k"`` (the whole sequence, a K tile: [T, BK]), ``"v"`` ([T, BV]) or ``"state"`` (a
    [B, H, K, V] state, blocked [BK, BV]; B, H, K, V are read from it). The kernel also gets ``C`` and ``NT``."""
    B, H, K, V = args[blocks.index("state")].shape
    T = args[0].shape[1]
    C, BK, BV = tiling.chunk_size, tiling.block_k, tiling.block_v
    NT = T // C
    smap = lambda b, h, i, j: (b, h, i, j)
    specs = {
        "k": pl.BlockSpec((SQ, T, SQ, BK), lambda b, h, i, j: (b, 0, h, i)),
        "v": pl.BlockSpec((SQ, T, SQ, BV), lambda b, h, i, j: (b, 0, h, j)),
        "state": pl.BlockSpec((SQ, SQ, BK, BV), smap),
    }
    return launch(
        kernel, args, [specs[blk] for blk in blocks], rel=rel,
        rel_spec=pl.BlockSpec((SQ, T), lambda b, h, i, j: (b, 0)),
        grid=(B, H, K // BK, V // BV),
        out_specs=[pl.BlockSpec((SQ, NT, SQ, BK, BV), lambda b, h, i, j: (b, 0, h, i, j)),
                   pl.BlockSpec((SQ, SQ, BK, BV), smap)],
        out_shape=[jax.ShapeDtypeStruct((B, NT, H, K, V), state_dtype),
                   jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
        tiling=tiling, interpret=interpret, name=name, C=C, NT=NT, **static,
    )


def per_chunk(kernel, args, *, rel, tiling: Tiling, interpret: bool, name: str, **static):
    """Launches ``kernel`` on grid (B, H, NT), every arg [B, T, H, D] blocked [C, D]; returns [B, T, H, C] float32.
    The kernel also gets ``C``."""
    B, T, H = args[0].shape[:3]
    C = tiling.chunk_size
    cmap = lambda b, h, n: (b, n, h, 0)
    return launch(
        kernel, args, [pl.BlockSpec((SQ, C, SQ, a.shape[-1]), cmap) for a in args], rel=rel,
        rel_spec=pl.BlockSpec((SQ, C), lambda b, h, n: (b, n)),
        grid=(B, H, T // C),
        out_specs=pl.BlockSpec((SQ, C, SQ, C), cmap),
        out_shape=jax.ShapeDtypeStruct((B, T, H, C), jnp.float32),
        tiling=tiling, interpret=interpret, name=name, C=C, **static,
    )


def per_chunk_v_tile(kernel, args, blocks, *, rel, out_dtype, tiling: Tiling, interpret: bool, name: str, **static):
    """Launches ``kernel`` on grid (B, H, NT, V/BV); returns [B, T, H, V] in ``out_dtype``.

    blocks: one per arg: ``"full"`` (a [B, T, H, D] array blocked [C, D]), ``"v"`` (a [B, T, H, V] array blocked
    [C, BV]; V is read from the first) or ``"state"`` (per-chunk states [B, NT, H, K, V] blocked [K, BV])."""
    B, T, H = args[0].shape[:3]
    V = args[blocks.index("v")].shape[-1]
    C, BV = tiling.chunk_size, tiling.block_v
    cmap = lambda b, h, n, j: (b, n, h, 0)
    vmap = lambda b, h, n, j: (b, n, h, j)

    def spec(a, blk):
        if blk == "full":
            return pl.BlockSpec((SQ, C, SQ, a.shape[-1]), cmap)
        if blk == "v":
            return pl.BlockSpec((SQ, C, SQ, BV), vmap)
        return pl.BlockSpec((SQ, SQ, SQ, a.shape[-2], BV), lambda b, h, n, j: (b, n, h, 0, j))

    return launch(
        kernel, args, [spec(a, blk) for a, blk in zip(args, blocks)], rel=rel,
        rel_spec=pl.BlockSpec((SQ, C), lambda b, h, n, j: (b, n)),
        grid=(B, H, T // C, V // BV),
        out_specs=pl.BlockSpec((SQ, C, SQ, BV), vmap),
        out_shape=jax.ShapeDtypeStruct((B, T, H, V), out_dtype),
        tiling=tiling, interpret=interpret, name=name, **static,
    )
