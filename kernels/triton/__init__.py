"""Pallas GPU kernels for chunkwise GLA, Triton lowering (``gla_jax.kernels.triton``; operator backend ``"triton"``).

``chunk_gla(q, k, v, g, ...)`` is the public entry (forward and backward, ``jax.custom_vjp``); ``forward.py`` and
``backward.py`` hold the kernels, ``tiling.py`` the block sizes, ``lowering.py`` a helper that lowers a function
for CUDA on a machine without a GPU and ``machine_code.py`` one that compiles the lowered kernels to sm_90 code
(shared memory, registers, spills; needs the ``triton`` package). The pure-jnp pieces shared with the other forms
(sub-chunk size, chunk-local cumulative sums, document encoding) come from ``gla_jax.ops.chunk_math``.
Needs only jax and numpy.
"""

from .chunk_gla import chunk_gla
from .tiling import Tiling

__all__ = ["chunk_gla", "Tiling"]
