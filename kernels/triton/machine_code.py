"""GPU machine code of the lowered kernels without a GPU: shared memory, registers and spills on a given CUDA arch.

The Triton IR that Pallas emits (``lowering.triton_modules``) is compiled here by the ``triton`` Python package
(and the ``ptxas`` bundled with it) for a CUDA target, e.g. sm_90 (H100/H200). On a GPU, XLA compiles the same IR
with its own copy of Triton, so the figures are a close estimate, not the exact binary: they catch kernels that
cannot launch (shared memory over the per-block limit), that spill registers to local memory, or that take minutes
to compile. Needs ``triton`` (a dependency of torch's CUDA builds and of flash-linear-attention), not a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
import time

from .lowering import TritonModule

#: Largest shared memory one thread block may use on sm_90 (H100/H200): 227 KiB.
SM90_MAX_SHARED_BYTES = 227 * 1024


@dataclasses.dataclass(frozen=True)
class MachineCode:
    """Resources of one compiled kernel."""

    name: str
    shared_bytes: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    ptx_lines: int
    compile_s: float
    num_warps: int
    num_stages: int


def _ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spills and stack of a PTX kernel, from ``ptxas -v`` (the one Triton itself uses for ``arch``)."""
    from triton.backends.nvidia import compiler as nv

    if hasattr(nv, "get_ptxas"):  # triton >= 3.4
        ptxas = nv.get_ptxas(arch).path
    else:
        ptxas = nv._path_to_binary("ptxas")[0]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        run = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o",
                              os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    log = run.stderr

    def grab(pattern):
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"ptxas -v printed no '{pattern}': {log[-500:]}")
        return int(m.group(1))

    return dict(registers=grab(r"Used (\d+) registers"), spill_store_bytes=grab(r"(\d+) bytes spill stores"),
                spill_load_bytes=grab(r"(\d+) bytes spill loads"), stack_bytes=grab(r"(\d+) bytes stack frame"))


def compile_module(module: TritonModule, *, arch: int = 90) -> MachineCode:
    """Compiles one Pallas Triton kernel for CUDA compute capability ``arch`` (90 = sm_90) on this machine."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise ImportError("compile_module: needs the `triton` package (pip install triton)") from e
    knobs = getattr(getattr(triton, "knobs", None), "compilation", None)
    cached = getattr(knobs, "always_compile", None)
    if knobs is not None:
        knobs.always_compile = True  # time a real compile, not a hit in Triton's on-disk cache
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{module.name}.ttir")
            with open(path, "w") as f:
                f.write(module.ir)
            # XLA's Triton fuses multiply-adds, as does Triton's default.
            kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": module.num_warps, "num_stages": module.num_stages,
                                             "enable_fp_fusion": True})
    finally:
        if knobs is not None:
            knobs.always_compile = cached
    elapsed = time.perf_counter() - start
    ptx = kernel.asm["ptx"]
    return MachineCode(name=module.name, shared_bytes=int(kernel.metadata.shared), **_ptxas_report(ptx, arch),
                       ptx_lines=ptx.count("\n"), compile_s=elapsed, num_warps=module.num_warps,
                       num_stages=module.num_stages)
