"""How fast the backend runs the matmul shapes of the chunk path, against the large matmul that ``bench_chunk.py``
uses as its reference, and how many cores each one keeps busy.

    python experiments/bench_matmul_forms.py                    # writes experiments/results/bench_matmul_forms_cpu.json
    python experiments/bench_matmul_forms.py --name bench_matmul_forms_cpu_rerun --reps 30

The chunk path's work is batches of small matmuls: per chunk and head [C, K]·[K, C], [C, C]·[C, V], [C, K]·[K, V]
and their transposes (C = K = V = 64). This benchmark times, in one process and round-robin (each rep runs every
form once, so load changes hit all alike; best of ``--reps`` per form), float32 at HIGHEST precision:

  * ``reference``: the 1024³ matmul of ``bench_chunk.py``;
  * ``batched_<n>``: ``[n, 64, 64]·[n, 64, 64]``, n = B·H·G = 32 (one step of the CPU group loop at B=1, H=4,
    G=8) and n = 512 (every chunk of T = 8192 at once);
  * ``batched_tn_<n>``: the same, contracting both operands' row axis (``"nck,ncv->nkv"``: the state update kᵀv);
  * ``unbatched_<n>``: the same FLOPs with one shared right operand, ``[n·64, 64]·[64, 64]``;
  * ``two_batched_32``: two independent ``batched_32`` products in one jitted function.

Per form: FLOPs (2·m·k·n per product), best time, GFLOP/s, that as a fraction of ``reference``, the busy cores
(process CPU time / wall time over the timed calls, median over reps: 1 = one core) and which kernel the
compiled HLO calls (``ynn`` when the product became an XNNPACK/YNNPACK fusion, else ``xla``).
What it showed on a 2-core CPU (docs/design.md §1): the batched forms keep about one core busy and run at a third
of the reference, which keeps both cores busy; only the unbatched form with a shared operand uses both.

Writes ``experiments/results/<--name>.json`` (refused if it exists, unless ``--replace``).
"""

from __future__ import annotations

import sys
import time

import common

DIM = 64
REFERENCE_N = 1024


def parse_args(argv):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--name", default="bench_matmul_forms_cpu", help="results file stem")
    p.add_argument("--reps", type=int, default=20, help="rounds over all forms (best time per form reported)")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 512], help="batch sizes n of the small products")
    args = p.parse_args(argv)
    if args.reps < 1 or min(args.batches) < 1:
        p.error("--reps and --batches must be >= 1")
    if args.smoke:
        args.reps, args.batches = 2, [2]
    return args


def forms(batches, smoke=False):
    """{name: (function, argument shapes, FLOPs per call)} of the matmul forms (module docstring)."""
    import jax.numpy as jnp
    from jax import lax

    hi = lax.Precision.HIGHEST
    d = DIM
    nn = lambda a, b: jnp.einsum("nij,njk->nik", a, b, precision=hi)
    out = {}
    ref = 128 if smoke else REFERENCE_N
    out["reference"] = (lambda a, b: jnp.dot(a, b, precision=hi), [(ref, ref), (ref, ref)], 2 * ref**3)
    for n in batches:
        flops = 2 * n * d**3
        out[f"batched_{n}"] = (nn, [(n, d, d), (n, d, d)], flops)
        out[f"batched_tn_{n}"] = (lambda a, b: jnp.einsum("nck,ncv->nkv", a, b, precision=hi), [(n, d, d), (n, d, d)],
                                  flops)
        out[f"unbatched_{n}"] = (lambda a, b: jnp.dot(a, b, precision=hi), [(n * d, d), (d, d)], flops)
    n = batches[0]
    out[f"two_batched_{n}"] = (lambda a, b, c, e: (nn(a, b), nn(c, e)), [(n, d, d)] * 4, 4 * n * d**3)
    return out


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    common.refuse_overwrite(args.out, args.name, args.replace)
    started = common.utc_now()
    import jax
    import numpy as np

    table = forms(args.batches, args.smoke)
    compiled, inputs = {}, {}
    for i, (name, (fn, shapes, _)) in enumerate(table.items()):
        keys = jax.random.split(jax.random.PRNGKey(i), len(shapes))
        inputs[name] = [jax.random.normal(k, s, np.float32) for k, s in zip(keys, shapes)]
        compiled[name] = jax.jit(fn).lower(*inputs[name]).compile()
        jax.block_until_ready(compiled[name](*inputs[name]))
    best = {name: float("inf") for name in table}
    busy = {name: [] for name in table}
    calls = 1 if args.smoke else 5
    for _ in range(args.reps):
        for name in table:
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(compiled[name](*inputs[name]))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = min(best[name], wall / calls)
            busy[name].append(cpu / wall)
    ref = table["reference"][2] / best["reference"]
    rows = []
    print(f"bench_matmul_forms: backend={jax.default_backend()} jax {jax.__version__} float32 HIGHEST, best of "
          f"{args.reps} round-robin reps")
    print(f"{'form':<18} {'shapes':<34} {'us':>9} {'GFLOP/s':>8} {'of ref':>7} {'cores':>6} {'kernel':>6}")
    for name, (_, shapes, flops) in table.items():
        hlo = compiled[name].as_text()
        row = dict(form=name, shapes=[list(s) for s in shapes], flops=flops, time_s=best[name],
                   flops_per_s=flops / best[name], fraction_of_reference=flops / best[name] / ref,
                   busy_cores=float(np.median(busy[name])), kernel="ynn" if "__ynn_fusion" in hlo else "xla")
        rows.append(row)
        shown = " x ".join(str(tuple(s)) for s in shapes[:2]) + (", twice" if len(shapes) > 2 else "")
        print(f"{name:<18} {shown:<34} {row['time_s'] * 1e6:>9.1f} "
              f"{row['flops_per_s'] / 1e9:>8.1f} {row['fraction_of_reference']:>7.3f} {row['busy_cores']:>6.2f} "
              f"{row['kernel']:>6}")
    config = dict(reps=args.reps, batches=args.batches, dim=DIM, dtype="float32", precision="HIGHEST",
                  calls_per_rep=calls, timing="round-robin over forms, best of reps; busy cores = process CPU time "
                                                 "/ wall time over a rep's calls, median over reps")
    path = common.write_results(args.name, config=config, seed=0, results=rows, out_dir=args.out, started=started,
                                replace=args.replace)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
