"""Pallas Mosaic TPU kernels for chunkwise GLA (``gla_jax.kernels.mosaic_tpu``). Needs only jax and numpy.

``chunk_gla`` is the entry (forward and ``custom_vjp`` backward); see ``tiling.py`` for the chunk structure and the
VMEM budget.
"""

from .chunk_gla import chunk_gla
from .tiling import Tiling, check_vmem, vmem_bytes

__all__ = ["chunk_gla", "Tiling", "check_vmem", "vmem_bytes"]
