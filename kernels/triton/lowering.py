"""Lowering for CUDA without a GPU: checks that every kernel passes the Pallas Triton lowering (power-of-two blocks,
supported ops, dot shapes) on a CPU-only machine, e.g. in CI.

On jax >= 0.11 lowering for a platform without local devices wants an abstract mesh that names the device kind;
older versions lower without one. ``lower_for_cuda`` handles both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import jax

#: The custom call that carries a Pallas Triton kernel in the lowered module.
TRITON_CALL = "xla.gpu.triton"


def _abstract_gpu_mesh(device_kind: str):
    """A one-device abstract mesh of the given GPU kind, or None where this jax has no such thing."""
    sharding = jax.sharding
    abstract_device_cls = getattr(sharding, "AbstractDevice", None)
    if abstract_device_cls is None or not hasattr(sharding, "use_abstract_mesh"):
        return None
    try:
        device = abstract_device_cls(device_kind=device_kind, num_cores=None, platform="cuda")
    except TypeError:
        try:
            device = abstract_device_cls(device_kind=device_kind, num_cores=None)
        except TypeError:
            return None
    try:
        return sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    except TypeError:
        return None


def lower_for_cuda(fn, *args, device_kind: str = "NVIDIA H100 80GB HBM3"):
    """``jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))``; args may be ``jax.ShapeDtypeStruct``.

    Runs under ``jax.sharding.use_abstract_mesh`` with an abstract ``device_kind`` device where jax supports it
    (required from jax 0.11 on). Raises whatever the lowering raises.
    """
    mesh = _abstract_gpu_mesh(device_kind)
    ctx = jax.sharding.use_abstract_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with ctx:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def triton_kernel_count(lowered) -> int:
    """Number of Pallas Triton custom calls in a lowered module (0 means no kernel was really lowered)."""
    return len(re.findall(re.escape(TRITON_CALL), lowered.as_text()))


@dataclasses.dataclass(frozen=True)
class TritonModule:
    """One Pallas Triton kernel of a lowered module: its name, Triton IR as text, launch grid and parameters."""

    name: str
    ir: str
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int


def triton_modules(lowered) -> list[TritonModule]:
    """The Triton kernels inside a module lowered for CUDA (``lower_for_cuda``), in call order, with their IR
    decoded from the custom calls' bytecode into text (the input of Triton's own compiler)."""
    from jax._src.lib.mlir import ir  # jaxlib's MLIR bindings: the context that knows the Triton dialect
    from jaxlib.triton import dialect as triton_dialect

    configs = []

    def visit(op):
        op = op.operation
        if op.name == "stablehlo.custom_call" and TRITON_CALL in ir.StringAttr(op.attributes["call_target_name"]).value:
            configs.append(ir.DictAttr(op.attributes["mhlo.backend_config"]))
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    visit(child)

    visit(lowered.compiler_ir("stablehlo").operation)
    ctx = ir.Context()
    triton_dialect.register_dialect(ctx)
    out = []
    with ctx:
        for cfg in configs:
            integer = lambda key: ir.IntegerAttr(cfg[key]).value
            text = str(ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes))
            out.append(TritonModule(name=ir.StringAttr(cfg["name"]).value, ir=text,
                                    grid=(integer("grid_x"), integer("grid_y"), integer("grid_z")),
                                    num_warps=integer("num_warps"), num_stages=integer("num_stages")))
    return out
