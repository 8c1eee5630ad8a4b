"""GPU resources of the Pallas kernels, measured without a GPU: shared memory, registers, spills, compile time.

Every Triton kernel of ``gla_jax.kernels.triton.chunk_gla`` (forward and backward, with and without packed documents)
is lowered for CUDA on this machine and compiled by the ``triton`` package for sm_90 (H100/H200), the way XLA compiles
it on a GPU (``kernels/triton/machine_code.py`` says how close that is). A kernel whose shared memory exceeds the
per-block limit cannot launch; register spills and long compiles cost speed and ``gpu_check.py`` time.

    python experiments/kernel_resources.py               # paper head sizes in bf16 and float32 (minutes on 2 cores)
    python experiments/kernel_resources.py --smoke       # one small shape

Writes ``kernel_resources.json`` (``kernel_resources_smoke.json``) into ``--out``.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

#: (K, V) head sizes of the paper's models: 340M (D=1024, 4 heads, expand_k 0.5) and 1.3B (D=2048).
HEADS = ((128, 256), (256, 512))
DTYPES = ("bfloat16", "float32")


def kernels_of(K: int, V: int, dtype: str, segments: bool, tiling: dict | None = None):
    """The Triton modules (forward then backward) of one chunk_gla configuration."""
    import jax
    import jax.numpy as jnp

    from gla_jax.kernels import chunk_gla
    from gla_jax.kernels.triton.lowering import lower_for_cuda, triton_modules

    B, T, H = 1, 512, 2
    dt = jnp.dtype(dtype)
    sd = jax.ShapeDtypeStruct
    args = [sd((B, T, H, K), dt), sd((B, T, H, K), dt), sd((B, T, H, V), dt), sd((B, T, H, K), jnp.float32)]
    if segments:
        args.append(sd((B, T), jnp.int32))

    def loss(q, k, v, g, *seg):
        o, _ = chunk_gla(q, k, v, g, segment_ids=seg[0] if seg else None, **(tiling or {}))
        return o.astype(jnp.float32).sum()

    return triton_modules(lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), *args))


def main(argv=None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (90 = H100/H200)")
    args = p.parse_args(argv)
    if args.arch < 80:
        p.error(f"--arch: expected a compute capability >= 80 (Ampere), got {args.arch}")
    name = "kernel_resources_smoke" if args.smoke else "kernel_resources"
    C.refuse_overwrite(args.out, name, args.replace or args.smoke)
    from gla_jax.kernels.triton.machine_code import SM90_MAX_SHARED_BYTES, compile_module

    started = C.utc_now()
    grid = [(64, 64, "bfloat16")] if args.smoke else [(K, V, d) for K, V in HEADS for d in DTYPES]
    rows = []
    for K, V, dtype in grid:
        for segments in (False, True):
            seen = set()
            for module in kernels_of(K, V, dtype, segments):
                if module.name in seen:  # the backward recomputes the forward's state pass: same kernel
                    continue
                seen.add(module.name)
                mc = compile_module(module, arch=args.arch)
                rows.append(dict(kernel=mc.name, K=K, V=V, dtype=dtype, segments=segments,
                                 shared_kib=round(mc.shared_bytes / 1024, 1), registers=mc.registers,
                                 spill_bytes=mc.spill_store_bytes + mc.spill_load_bytes, ptx_lines=mc.ptx_lines,
                                 compile_s=round(mc.compile_s, 1), num_warps=mc.num_warps,
                                 fits=mc.shared_bytes <= SM90_MAX_SHARED_BYTES))
                print(C.format_table([rows[-1]]).splitlines()[-1], flush=True)
    print(C.format_table(rows))
    over = [r for r in rows if not r["fits"]]
    spills = [r for r in rows if r["spill_bytes"]]
    print(f"{len(rows)} kernels compiled for sm_{args.arch}: {len(over)} over the shared-memory limit, "
          f"{len(spills)} spilling registers, slowest compile {max(r['compile_s'] for r in rows)} s")
    path = C.write_results(name, config=dict(arch=args.arch, smoke=args.smoke, B=1, T=512, H=2), seed=args.seed,
                           results=rows, out_dir=args.out, started=started,
                           extra=dict(max_shared_bytes=SM90_MAX_SHARED_BYTES), replace=True)
    print(f"wrote {path}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
