"""Pallas Mosaic TPU kernels for chunkwise GLA (``gla_jax.kernels.mosaic_tpu``). Needs only jax and numpy.

``chunk_gla`` is the entry (forward and ``custom_vjp`` backward). Same algorithm as the Triton kernels
(docs/design.md §1-2: chunkwise form, secondary chunking, per-chunk dg identity), laid out for the TPU:

Layout and padding. K and V are padded to multiples of 128 (lanes) and T to the chunk. q, k, g, v stay in the
operator's [B, T, H, W] layout, viewed as [B, T, H·W] (a free reshape): with W a multiple of 128, a head's [C, W]
slab is one BlockSpec block indexed (b, chunk, h), which satisfies the (8, 128) block rule with no transpose in
HBM. Squeezing H out of [B, T, H, W] directly would put a size-1 block on the sublane axis, which the rule forbids.

Kernels (grid (B, H, NT), chunks "arbitrary" = sequential, B and H "parallel"):
  * forward (non-materialised): the [K, V] float32 state lives in VMEM scratch across the chunk axis; per chunk
    the intra-chunk matrix A, o = A v + (scale q ⊙ e^g) S and the state update, in one kernel. On a TPU the grid
    is a loop on one TensorCore anyway, so walking chunks in order costs no parallelism, and no chunk states go
    to HBM.
  * states: the chunk-start states for the backward (recomputed, in the matmul dtype).
  * backward: one reverse walk with dS in VMEM scratch: dA, dv, dq, dk, dg and the dS update per chunk, A
    recomputed in VMEM (nothing [T, C]-sized is stored by the forward).

Chunk 128, sub-chunk 16. The chunk is a multiple of the lane width so that the [C, C] matrices (A, dA, the dg
mask) and the [1, C] document-id rows are whole vector tiles, and the big products ([C, C] x [C, V],
[C, K]ᵀ x [C, V], [C, K] x [K, V]) fill the MXU: 128 is the MXU edge on v5e (128x128), 256 on v6e (chunk
256 with sub-chunk 32 is a shipped option; the VMEM estimate still fits v6e's 32 MiB scoped limit at K=256,
V=512). Inside a chunk, per-channel decay makes A an elementwise product over K, not a matmul; secondary chunking
turns most of it into MXU work: each 16-row strip I is one [16, K] x [K, C] product relative to the gate at I's
first row, and only the 16x16 diagonal blocks are elementwise (float32, log space). Per chunk that costs
~C·K·(C/c + c) exponentials, minimal near c = √C ≈ 11; c = 16 is the nearest size that is a whole bfloat16
vector tile (16 sublanes), so every strip slice is tile-aligned.

Zero gates (α = 0, g = −inf): the gates arrive as two float32 cumulative sums, of the finite gates and of
exact −256 steps at zero gates (``gla_jax.ops.gates``), and every exponent is their summed difference
(``blocks.gap``), so a zero gate zeroes exactly the decays that cross it and nothing else.

Stability (log α down to −20 per step). Gates are float32 chunk-local cumulative sums; every exponential has an
exponent ≤ 0 (strips are taken relative to a reference inside the strip's range, diagonal entries are
e^{g_i − g_j} with i ≥ j, masked entries are clamped to ≤ 0 before the mask), so values underflow to 0 at worst
and never overflow. Over 16 steps at −20 the strip factor underflows only where the true product is < e^{−87}.

Mosaic-safe code (``blocks.py``): only 2-D tile-aligned values; rows and columns of a small block are picked by
masked reductions, the per-channel chunk decay arrives as a [K, 1] column computed outside, and the one
column-to-row move (Σ_v S ⊙ dS for dg) is an MXU product with a ones matrix: no lane-changing reshapes, which
export cannot check (Mosaic's layout passes run only on a TPU).

VMEM (``tiling.py``): a per-kernel estimate (double-buffered blocks in (8, 128)/(16, 128) tiles, scratch, and
the live float32 temporaries), checked against the generation's default scoped limit (16 MiB v4/v5e/v5p, 32 MiB
v6e): bf16 at K=128/V=256 needs ~2.5 / 1.6 / 3.8 MiB (forward / states / backward), at K=256/V=512 ~6.1 / 4.5 /
9.4 MiB.
"""

from .chunk_gla import chunk_gla
from .tiling import Tiling, check_vmem, vmem_bytes

__all__ = ["chunk_gla", "Tiling", "check_vmem", "vmem_bytes"]
