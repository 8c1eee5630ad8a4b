"""Pallas kernels for chunkwise GLA, one folder per backend, imported as ``gla_jax.kernels``:

- ``triton/``: Pallas GPU kernels, Triton lowering (operator backend ``"triton"``, alias ``"pallas"``);
- ``mosaic_gpu/``: Pallas Hopper kernels, Mosaic GPU lowering (wgmma, TMA; backend ``"mosaic_gpu"``);
- ``mosaic_tpu/``: Pallas TPU kernels, Mosaic lowering (backend ``"mosaic_tpu"``).

Each backend is registered once in ``gla_jax.ops.backends`` (docs/design.md §5). ``from gla_jax.kernels import
chunk_gla`` still gives the Triton entry (imported on first use, so importing another backend does not load it).
Needs only jax and numpy.
"""

__all__ = ["chunk_gla", "Tiling"]


def __getattr__(name):
    if name in __all__:
        from . import triton

        return getattr(triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
