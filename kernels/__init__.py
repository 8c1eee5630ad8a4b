"""Pallas GPU (Triton backend) kernels for chunkwise GLA, imported as ``gla_jax.kernels``.

``chunk_gla(q, k, v, g, ...)`` is the public entry (forward and backward, ``jax.custom_vjp``); ``forward.py`` and
``backward.py`` hold the kernels, ``tiling.py`` the block sizes, ``lowering.py`` a helper that lowers a function
for CUDA on a machine without a GPU and ``machine_code.py`` one that compiles the lowered kernels to sm_90 code
(shared memory, registers, spills; needs the ``triton`` package). Needs only jax and numpy.
"""

from .chunk_gla import chunk_gla
from .tiling import Tiling

__all__ = ["chunk_gla", "Tiling"]
