"""Scalar-gate fast path against the vector-gate chunk form on the same (scalar) gates.

    python experiments/bench_scalar_gate.py            # T = 512, 2048; H = 4, K = V = 64; writes
                                                       # experiments/results/bench_scalar_gate_cpu.json
    python experiments/bench_scalar_gate.py --smoke    # seconds-long check (nothing is written)

Times ``gla_scalar`` (gates [B, T, H]) and ``gla(impl="chunk")`` (the same gates broadcast to [B, T, H, K]), forward
and forward+backward, median over repeats after a compile-and-warm-up call, and records their output difference. An
existing results file is kept unless ``--replace`` is given. CPU timings on a shared machine are noisy: the JSON
records the device and CPU count; compare only rows of one run.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from common import base_parser, format_table, median_seconds, refuse_overwrite, utc_now, write_bench_results
from gla_jax.ops import gla
from gla_jax.ops.scalar import gla_scalar

NAME = "bench_scalar_gate"


def bench_one(B, T, H, K, V, chunk, repeats, seed=0):
    r = np.random.default_rng(seed)
    q, k = (jnp.asarray(r.standard_normal((B, T, H, K)), jnp.float32) for _ in range(2))
    v = jnp.asarray(r.standard_normal((B, T, H, V)), jnp.float32)
    g = jnp.asarray(np.log(r.uniform(0.9, 1.0, (B, T, H))), jnp.float32)

    def scalar(q, k, v, g):
        return gla_scalar(q, k, v, g, chunk_size=chunk)[0]

    def vector(q, k, v, g):
        return gla(q, k, v, jnp.broadcast_to(g[..., None], q.shape), impl="chunk", chunk_size=chunk)[0]

    row = {"B": B, "T": T, "H": H, "K": K, "V": V, "chunk": chunk}
    outs = {}
    for name, f in (("scalar", scalar), ("vector", vector)):
        fwd = jax.jit(f)
        bwd = jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3)))
        row[f"{name}_fwd_ms"] = 1e3 * median_seconds(fwd, (q, k, v, g), repeats)
        row[f"{name}_fwdbwd_ms"] = 1e3 * median_seconds(bwd, (q, k, v, g), repeats)
        outs[name] = np.asarray(fwd(q, k, v, g), np.float64)
    row["speedup_fwd"] = row["vector_fwd_ms"] / row["scalar_fwd_ms"]
    row["speedup_fwdbwd"] = row["vector_fwdbwd_ms"] / row["scalar_fwdbwd_ms"]
    row["rel_diff"] = float(np.linalg.norm(outs["scalar"] - outs["vector"]) / np.linalg.norm(outs["vector"]))
    return row


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="sequence lengths T")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64, help="K = V")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.heads, args.head_dim, args.repeats = [64], 2, 16, 2
    refuse_overwrite(args.out, f"{NAME}_{jax.default_backend()}", args.replace or args.smoke)
    started = utc_now()
    rows = [bench_one(1, T, args.heads, args.head_dim, args.head_dim, args.chunk, args.repeats)
            for T in args.lengths]
    print(format_table(rows, ["T", "H", "K", "scalar_fwd_ms", "vector_fwd_ms", "speedup_fwd", "scalar_fwdbwd_ms",
                              "vector_fwdbwd_ms", "speedup_fwdbwd", "rel_diff"]))
    write_bench_results(f"{NAME}_{jax.default_backend()}", args, rows, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
