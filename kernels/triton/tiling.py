"""Tile sizes, Triton compiler parameters and small version shims shared by the GLA Pallas kernels.

Every block that a kernel loads or computes on must have power-of-two dimensions (a Triton requirement) and
matmul operands at least 16 wide (the smallest ``tl.dot`` tile). The wrapper pads K and V up to such sizes, so
the tile sizes here only need to divide the padded widths.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools

import jax.numpy as jnp
from jax import lax

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gla_jax.ops.chunk_math import SUB_CHUNK

#: Marks a block dimension of size one that the kernel does not see (``None`` in older jax).
SQUEEZED = getattr(pl, "squeezed", None)



#: True while ``launch`` traces a kernel for Pallas interpret mode (XLA on the CPU, which lacks the TF32 algorithms).
_INTERPRET = contextvars.ContextVar("gla_kernels_interpret", default=False)


def dot(a, b, *, trans_a=False, trans_b=False, tf32=False):
    """2-D matmul with float32 accumulation inside a Triton kernel (``pallas.triton.dot`` where it exists).

    float32 operands are multiplied to float32 accuracy unless ``tf32``: on the GPU as three TF32 tensor-core
    products (Triton's ``tf32x3``; IEEE float32 ``dot`` runs on the CUDA cores, spills registers and is many times
    slower), in interpret mode in IEEE float32. With ``tf32`` they are plain TF32 (a 10-bit mantissa, ~1e-3).
    Half-precision operands are unaffected."""
    fn = getattr(plgpu, "dot", None) or pl.dot
    precision = None  # half precision: the native tensor-core product; float32: TF32
    if a.dtype == jnp.float32 and b.dtype == jnp.float32 and not tf32:
        precision = lax.Precision.HIGHEST if _INTERPRET.get() else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return fn(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters under the name of the installed jax (``CompilerParams`` or the older
    ``TritonCompilerParams``)."""
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    if cls is None:  # very old jax: the class lived in pallas itself
        cls = getattr(pl, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def launch(kernel, args, in_specs, *, rel, rel_spec, grid, out_specs, out_shape, tiling: "Tiling", interpret: bool,
           name: str, **static):
    """``pl.pallas_call`` of ``kernel`` over ``args``, with the optional packed-document array ``rel`` (blocked by
    ``rel_spec``) appended as the last input; ``has_seg`` and ``static`` are bound as keyword arguments."""
    has_seg = rel is not None
    if has_seg:
        args, in_specs = [*args, rel], [*in_specs, rel_spec]
    call = pl.pallas_call(
        functools.partial(kernel, has_seg=has_seg, **static),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(tiling.num_warps, tiling.num_stages),
        interpret=interpret,
        name=name,
    )
    token = _INTERPRET.set(bool(interpret))
    try:  # the kernel is traced here, so ``dot`` sees the mode
        return call(*args)
    finally:
        _INTERPRET.reset(token)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def padded_width(n: int) -> int:
    """Head width after padding: a power of two, at least 16 (the smallest matmul tile)."""
    return max(SUB_CHUNK, next_pow2(n))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block sizes and launch parameters of the kernels (all powers of two; hashable, used as a static argument).

    chunk_size: C, the chunk length (>= 16). block_k / block_v: K and V tiles of the state and output kernels.
    block_k_bwd: K tile of the dq/dk kernel.
    num_warps, num_stages: Triton launch parameters of every kernel.
    """

    chunk_size: int = 64
    block_k: int = 64
    block_v: int = 64
    block_k_bwd: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def resolve(self, K: int, V: int) -> "Tiling":
        """Clips the blocks to the (padded, power-of-two) head widths K and V."""
        return dataclasses.replace(
            self,
            block_k=min(self.block_k, K),
            block_v=min(self.block_v, V),
            block_k_bwd=min(self.block_k_bwd, K),
        )

    def validate(self) -> None:
        for name in ("chunk_size", "block_k", "block_v", "block_k_bwd"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < SUB_CHUNK or val & (val - 1):
                raise ValueError(f"{name}: expected a power of two >= {SUB_CHUNK}, got {val!r}")
        for name in ("num_warps", "num_stages"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
