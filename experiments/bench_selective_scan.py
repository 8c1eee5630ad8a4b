"""Chunked selective scan (Mamba v1) against a plain ``lax.scan``: time and compiled memory of forward+backward.

Forms: ``chunked_seq`` (checkpointed chunks, each a ``lax.scan``: the CPU default), ``chunked_assoc`` (checkpointed
chunks, each an ``associative_scan``: the accelerator default) and ``sequential`` (one plain ``lax.scan``).

    python experiments/bench_selective_scan.py            # T = 1024, 4096, 16384; Dm = 256, N = 16; writes
                                                          # experiments/results/bench_selective_scan_cpu.json
    python experiments/bench_selective_scan.py --smoke    # seconds-long check (nothing is written)

For each T: XLA's temporary-buffer size of the compiled forward+backward (``memory_analysis``: what decides whether
a long sequence fits), and the median time over repeats after a warm-up call. An existing results file is kept
unless ``--replace`` is given. CPU timings on a shared machine are noisy; compare rows of one run only.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from common import (base_parser, format_table, median_seconds, memory_estimate, refuse_overwrite, utc_now,
                    write_bench_results)
from gla_jax.ops.selective_scan import selective_scan, selective_scan_sequential

NAME = "bench_selective_scan"


def bench_one(T, Dm, N, chunk, repeats, seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.standard_normal((1, T, Dm)), jnp.float32)
    dt = jnp.asarray(np.log1p(np.exp(r.standard_normal((1, T, Dm)) - 2)), jnp.float32)
    A = -jnp.asarray(np.exp(r.standard_normal((Dm, N)) * 0.5), jnp.float32)
    Bm, Cm = (jnp.asarray(r.standard_normal((1, T, N)), jnp.float32) for _ in range(2))
    forms = {"chunked_seq": lambda *a: selective_scan(*a, chunk_size=chunk, inner="sequential")[0],
             "chunked_assoc": lambda *a: selective_scan(*a, chunk_size=chunk, inner="associative")[0],
             "sequential": lambda *a: selective_scan_sequential(*a)[0]}
    row = {"T": T, "Dm": Dm, "N": N, "chunk": chunk, "per_step_state_MiB": T * Dm * N * 4 / 2 ** 20}
    outs = {}
    for name, f in forms.items():
        grad = jax.jit(jax.grad(lambda x, dt, A, B, C, f=f: jnp.sum(f(x, dt, A, B, C) ** 2), argnums=(0, 1, 2, 3, 4)))
        compiled = grad.lower(x, dt, A, Bm, Cm).compile()
        mem = memory_estimate(compiled)
        row[f"{name}_temp_MiB"] = None if mem["temp_bytes"] is None else mem["temp_bytes"] / 2 ** 20
        row[f"{name}_fwdbwd_ms"] = 1e3 * median_seconds(compiled, (x, dt, A, Bm, Cm), repeats)
        outs[name] = np.asarray(jax.jit(f)(x, dt, A, Bm, Cm), np.float64)
    ref = outs["sequential"]
    row["max_rel_diff"] = max(float(np.linalg.norm(o - ref) / np.linalg.norm(ref)) for o in outs.values())
    return row


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--inner", type=int, default=256, help="Dm (the Mamba inner width)")
    p.add_argument("--state", type=int, default=16, help="N")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.inner, args.state, args.repeats = [128], 16, 4, 1
    refuse_overwrite(args.out, f"{NAME}_{jax.default_backend()}", args.replace or args.smoke)
    started = utc_now()
    rows = [bench_one(T, args.inner, args.state, args.chunk, args.repeats) for T in args.lengths]
    print(format_table(rows, ["T", "per_step_state_MiB", "chunked_seq_temp_MiB", "chunked_assoc_temp_MiB",
                              "sequential_temp_MiB", "chunked_seq_fwdbwd_ms", "chunked_assoc_fwdbwd_ms",
                              "sequential_fwdbwd_ms", "max_rel_diff"]))
    write_bench_results(f"{NAME}_{jax.default_backend()}", args, rows, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
