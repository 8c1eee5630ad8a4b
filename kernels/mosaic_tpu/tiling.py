"""Tiling of the Mosaic TPU GLA kernels: chunk and sub-chunk sizes, padding to the TPU's vector tiles, the VMEM
footprint of each kernel and its check against the target generation's scoped VMEM limit.

TPU facts used here (JAX Pallas TPU docs and the Mosaic compiler's defaults):
  * A vector register is [8 sublanes, 128 lanes] of 32-bit values; 16-bit values pack two per sublane, so a
    bfloat16 tile is [16, 128]. A BlockSpec's last two dimensions must be multiples of (8, 128) or span the whole
    array dimension; VMEM buffers are laid out in such tiles, so a [C, 1] block still occupies [C, 128].
  * The scoped VMEM limit (what one kernel's pipelined blocks and scratch may use unless ``vmem_limit_bytes``
    raises it) is 16 MiB by default on v4/v5e/v5p and 32 MiB on v6e; physical VMEM is 128 MiB on v5e and v6e
    (95 MiB on v5p, 32 MiB on v4). We check against the default scoped limit, so no compiler flag is needed.
  * Export for TPU on a CPU machine checks the (8, 128) block rule but not the VMEM budget (that is checked by
    Mosaic's layout and allocation passes, which run only on a TPU), hence the estimate below.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

#: Lanes of a vector register (and the MXU's edge on v5e): K and V are padded to a multiple of this.
LANE = 128
#: Sublanes of a vector register for 32-bit values.
SUBLANE = 8

#: Default scoped VMEM limit per generation (bytes): what a kernel may use without raising ``vmem_limit_bytes``.
SCOPED_VMEM_BYTES = {
    "v4": 16 << 20,
    "v5e": 16 << 20,
    "v5p": 16 << 20,
    "v6e": 32 << 20,
}
#: Physical VMEM per core (bytes), for reference in error messages.
PHYSICAL_VMEM_BYTES = {"v4": 32 << 20, "v5e": 128 << 20, "v5p": 95 << 20, "v6e": 128 << 20}


def round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def padded_width(n: int) -> int:
    """Head width after padding: a multiple of the lane width 128 (K and V live on lanes)."""
    return round_up(n, LANE)


def tile_bytes(shape, dtype) -> int:
    """VMEM bytes of one buffer of ``shape``: the last dim rounded up to 128 lanes, the second-to-last to the
    dtype's sublane tile (8 for 32-bit, 16 for 16-bit values)."""
    itemsize = jnp.dtype(dtype).itemsize
    shape = (1, *shape) if len(shape) == 1 else tuple(shape)
    *lead, rows, cols = shape
    n = 1
    for d in lead:
        n *= d
    return n * round_up(rows, SUBLANE * max(1, 4 // itemsize)) * round_up(cols, LANE) * itemsize


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Chunk structure of the TPU kernels (hashable: a static argument).

    chunk_size: C, the chunk length, a multiple of 128 (the lane width: the [C, C] intra-chunk matrices and the
      [1, C] rows of document ids are whole vector tiles). 128 fills the v5e MXU; 256 matches v6e's.
    sub_chunk: c, the secondary chunk: off-diagonal [c, C] strips of the intra-chunk matrix are MXU products,
      the c x c diagonal blocks are elementwise in float32. A multiple of 16 (a bfloat16 vector tile's rows) that
      divides C.
    generation: TPU generation whose scoped VMEM limit the footprint is checked against.
    """

    chunk_size: int = 128
    sub_chunk: int = 16
    generation: str = "v5e"

    def validate(self) -> None:
        C, c = self.chunk_size, self.sub_chunk
        if not isinstance(C, int) or isinstance(C, bool) or C < LANE or C % LANE:
            raise ValueError(f"chunk_size: expected a multiple of {LANE} (the TPU lane width), got {C!r}")
        if not isinstance(c, int) or isinstance(c, bool) or c < 16 or c % 16 or C % c:
            raise ValueError(f"sub_chunk: expected a multiple of 16 dividing chunk_size={C}, got {c!r}")
        if self.generation not in SCOPED_VMEM_BYTES:
            raise ValueError(f"generation: expected one of {tuple(SCOPED_VMEM_BYTES)}, got {self.generation!r}")


# ------------------------------------------------------------------------------------------------- VMEM footprint

F32 = jnp.float32
I32 = jnp.int32


def _blocks(blocks) -> int:
    """Pipelined blocks: two buffers each (double buffering)."""
    return sum(2 * tile_bytes(shape, dt) for shape, dt in blocks)


def vmem_bytes(kernel: str, tiling: Tiling, K: int, V: int, dtype, *, has_seg: bool = True) -> int:
    """Estimated VMEM bytes of one kernel ("forward", "states" or "backward") at padded head widths K, V and
    matmul dtype ``dtype``: double-buffered blocks + scratch + the live float32 temporaries of one grid step
    (counted generously: every [C, K], [C, V], [C, C] and [K, V] value the kernel body holds at its peak)."""
    C = tiling.chunk_size
    dt = jnp.dtype(dtype)
    seg = [((C, 1), I32), ((1, C), I32)] if has_seg else []
    state_f32 = ((K, V), F32)
    if kernel == "forward":
        blocks = [((C, K), dt), ((C, K), dt), ((C, V), dt), ((C, K), F32), ((C, K), F32), ((K, 1), F32), state_f32,
                  *seg, ((C, V), dt), state_f32]
        scratch = [state_f32, ((C, C), F32)]
        temps = [((C, K), F32)] * 6 + [((C, V), F32)] * 2 + [((C, C), F32)] * 3 + [((K, V), F32)]
    elif kernel == "states":
        blocks = [((C, K), dt), ((C, V), dt), ((C, K), F32), ((C, K), F32), ((K, 1), F32), state_f32, *seg,
                  ((K, V), dt)]
        scratch = [state_f32]
        temps = [((C, K), F32)] * 2 + [((K, V), F32)] * 2
    elif kernel == "backward":
        blocks = [((C, K), dt), ((C, K), dt), ((C, K), F32), ((C, K), F32), ((C, V), dt), ((C, V), dt), ((K, V), dt),
                  ((K, 1), F32), state_f32, *seg,
                  ((C, K), dt), ((C, K), dt), ((C, K), F32), ((C, V), dt), state_f32]
        scratch = [state_f32, ((C, C), F32), ((C, C), F32)]
        temps = [((C, K), F32)] * 11 + [((C, V), F32)] * 3 + [((C, C), F32)] * 4 + [((K, V), F32)] * 3
    else:
        raise ValueError(f"kernel: expected 'forward', 'states' or 'backward', got {kernel!r}")
    return _blocks(blocks) + sum(tile_bytes(s, d) for s, d in scratch + temps)


def check_vmem(tiling: Tiling, K: int, V: int, dtype, *, has_seg: bool = True) -> dict[str, int]:
    """Estimates every kernel's VMEM footprint; a one-line ValueError naming ``chunk_size`` when one exceeds the
    generation's scoped limit. Returns {kernel: bytes}."""
    limit = SCOPED_VMEM_BYTES[tiling.generation]
    out = {}
    for kernel in ("forward", "states", "backward"):
        n = vmem_bytes(kernel, tiling, K, V, dtype, has_seg=has_seg)
        if n > limit:
            raise ValueError(
                f"chunk_size: {tiling.chunk_size} needs ~{n / 2**20:.1f} MiB of VMEM in the {kernel} kernel at "
                f"K={K}, V={V} ({jnp.dtype(dtype).name}), over the {limit >> 20} MiB scoped limit of "
                f"{tiling.generation}; use a smaller chunk_size")
        out[kernel] = n
    return out
