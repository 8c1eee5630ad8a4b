"""Speed of the pure-JAX chunk operator (``impl="chunk"``) against the machine's own matmul speed, measured beside it.

    python experiments/bench_chunk.py                       # T = 2048 .. 16384, recurrent at T = 4096
    python experiments/bench_chunk.py --name bench_chunk_cpu_before --T 2048 8192

For each sequence length T it times, in one process and interleaved so that load changes hit both alike:

  * a 1024³ float32 matmul (``a @ b``, best of ``--reps``) right before and right after the row: the row's reference
    speed is the better of the two (2·1024³ FLOPs per call);
  * the chunk operator's forward, its backward alone (the ``jax.vjp`` pullback, jitted, residuals as inputs) and
    forward+backward as a training step pays it: ``jax.value_and_grad`` of the loss ⟨o, do⟩, which needs the output
    and every input gradient (best of ``--reps`` each, one warm-up call excluded). A bare jitted ``jax.vjp``
    pullback would let XLA drop the forward's output-only work, which no training step can; files before
    ``bench_chunk_cpu_after4`` timed that bare pullback;
  * the plain ``lax.scan`` recurrence (``impl="recurrent"``) fwd+bwd at the ``--recurrent-T`` lengths.

FLOPs of the algorithm's own work (what a well-shaped chunkwise form must do; C the chunk size):

    forward  = 2 · (C·(K + V) + 2·K·V)  per token and head   (intra-chunk Q Kᵀ and A V, inter-chunk Q S, state Kᵀ V)
    fwd+bwd  = 3 × forward

Beside the reference it times the chunk path's own product shape, a batched ``[32, 64, 64]·[32, 64, 64]`` matmul
(n = B·H·G = 32 products, one step of the CPU group loop), which XLA:CPU runs on one core
(``bench_matmul_forms.py``); files from ``bench_chunk_cpu_after5`` on carry it.

Reported per row: times (ms), GFLOP/s of fwd+bwd, the fraction of the matmul speed measured beside it, bwd/fwd,
and the fraction of the batched small-matmul speed.
Targets (issue 16): fwd+bwd at T=8192 >= 0.2 of the matmul speed; time(T=16384)/time(T=2048) <= 9;
recurrent/chunk at T=4096 >= 10; backward <= 2x forward. On a shared machine only the side-by-side ratios mean
anything: absolute times move with the load.

Writes ``experiments/results/<--name>.json`` (refused if it exists, unless ``--replace``).
"""

from __future__ import annotations

import sys
import time

import bench_matmul_forms
import bench_ops
import common

DEFAULT_T = (2048, 4096, 8192, 16384)
MATMUL_N = 1024
SMALL_BATCH = 32
TARGETS = (
    ("fraction_of_matmul_T8192", "chunk fwd+bwd FLOP/s / matmul FLOP/s at T=8192", ">=", 0.2),
    ("scaling_T16384_over_T2048", "chunk fwd+bwd time(T=16384) / time(T=2048)", "<=", 9.0),
    ("recurrent_over_chunk_T4096", "recurrent fwd+bwd / chunk fwd+bwd at T=4096", ">=", 10.0),
    ("bwd_over_fwd_T8192", "chunk backward / forward at T=8192", "<=", 2.0),
)


def parse_args(argv):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--name", default="bench_chunk_cpu", help="results file stem")
    p.add_argument("--T", type=int, nargs="+", default=list(DEFAULT_T), help="sequence lengths")
    p.add_argument("--recurrent-T", type=int, nargs="*", default=[4096], help="lengths that also time the recurrence")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--V", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="timed calls per measurement (best reported)")
    args = p.parse_args(argv)
    if min(args.T) < 1 or min(args.B, args.H, args.K, args.V, args.reps, args.chunk_size) < 1:
        p.error("--T, --B, --H, --K, --V, --chunk-size and --reps must be >= 1")
    if args.smoke:
        args.T, args.recurrent_T, args.reps = [256], [256], 1
    return args


def chunk_flops_fwd(B, T, H, K, V, C):
    """The algorithm's forward FLOPs: 2·(C(K+V) + 2KV) per token and head (module docstring)."""
    return 2 * (C * (K + V) + 2 * K * V) * B * T * H


def best_time(fn, args, reps):
    """(best of ``reps`` timed calls, first call) in seconds; ``jax.block_until_ready`` on each result."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best, first


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    common.refuse_overwrite(args.out, args.name, args.replace)
    started = common.utc_now()
    import jax
    import jax.numpy as jnp

    from gla_jax.ops import gla

    B, H, K, V, C = args.B, args.H, args.K, args.V, args.chunk_size
    a = jax.random.normal(jax.random.PRNGKey(0), (MATMUL_N, MATMUL_N), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)

    def matmul_flops():
        return 2 * MATMUL_N**3 / best_time(matmul, (a, a), args.reps)[0]

    # The chunk path's own product shape: one batched [n, 64, 64]·[n, 64, 64] matmul (n = 32 = B·H·G of the CPU
    # group loop at the default shape), which XLA:CPU runs on one core (bench_matmul_forms.py, docs/design.md §1).
    product, shapes, product_flops = bench_matmul_forms.forms([SMALL_BATCH])[f"batched_{SMALL_BATCH}"]
    small = [jax.random.normal(jax.random.PRNGKey(i + 1), s, jnp.float32) for i, s in enumerate(shapes)]
    batched = jax.jit(product)

    def batched_flops():
        return product_flops / best_time(batched, small, args.reps)[0]

    def make(impl):
        def run(q, k, v, g):
            return gla(q, k, v, g, impl=impl, chunk_size=C)[0] if impl == "chunk" else gla(q, k, v, g, impl=impl)[0]

        def fb(q, k, v, g, do):  # a training step: the output (the loss needs it) and the input gradients
            return jax.value_and_grad(lambda *x: jnp.vdot(run(*x), do), argnums=(0, 1, 2, 3))(q, k, v, g)

        return jax.jit(run), jax.jit(fb), jax.jit(lambda q, k, v, g: jax.vjp(run, q, k, v, g)[1])

    pullback = jax.jit(lambda vjp_fn, do: vjp_fn(do))
    rows = []
    print(f"bench_chunk: backend={jax.default_backend()} B={B} H={H} K={K} V={V} C={C} float32 reps={args.reps} "
          f"(best of); matmul {MATMUL_N}^3 float32 timed before and after each row", flush=True)
    print(f"{'impl':<9} {'T':>6} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'bwd/fwd':>7} {'GFLOP/s':>8} "
          f"{'mm GFLOP/s':>10} {'frac':>6} {'bmm GFLOP/s':>11} {'frac b':>6}", flush=True)
    for T in args.T:
        key = jax.random.split(jax.random.PRNGKey(T), 5)
        q = jax.random.normal(key[0], (B, T, H, K), jnp.float32)
        k = jax.random.normal(key[1], (B, T, H, K), jnp.float32)
        v = jax.random.normal(key[2], (B, T, H, V), jnp.float32)
        g = jax.nn.log_sigmoid(jax.random.normal(key[3], (B, T, H, K), jnp.float32) + 2.0) / 16
        do = jax.random.normal(key[4], (B, T, H, V), jnp.float32)
        for impl in ["chunk"] + (["recurrent"] if T in args.recurrent_T else []):
            fwd, fb, vjp = make(impl)
            mm_before, small_before = matmul_flops(), batched_flops()
            row = {"impl": impl, "T": T, "B": B, "H": H, "K": K, "V": V, "chunk_size": C}
            row["fwd_s"], row["first_fwd_s"] = best_time(fwd, (q, k, v, g), args.reps)
            row["fwd_bwd_s"], row["first_fwd_bwd_s"] = best_time(fb, (q, k, v, g, do), args.reps)
            if impl == "chunk":
                vjp_fn = vjp(q, k, v, g)
                row["bwd_s"], _ = best_time(pullback, (vjp_fn, do), args.reps)
                del vjp_fn
            mm_after, small_after = matmul_flops(), batched_flops()
            mm = max(mm_before, mm_after)
            row["matmul_flops_per_s"] = mm
            row["batched_matmul_flops_per_s"] = max(small_before, small_after)
            if impl == "chunk":
                flops = 3 * chunk_flops_fwd(B, T, H, K, V, C)
                row["flops_fwd_bwd"] = flops
                row["flops_per_s"] = flops / row["fwd_bwd_s"]
                row["fraction_of_matmul"] = row["flops_per_s"] / mm
                row["fraction_of_batched_matmul"] = row["flops_per_s"] / row["batched_matmul_flops_per_s"]
                row["bwd_over_fwd"] = row["bwd_s"] / row["fwd_s"]
            rows.append(row)
            f = lambda x, s=1e3: "-" if x is None else f"{x * s:.4g}"
            print(f"{impl:<9} {T:>6} {f(row['fwd_s']):>9} {f(row.get('bwd_s')):>9} {f(row['fwd_bwd_s']):>9} "
                  f"{f(row.get('bwd_over_fwd'), 1):>7} {f(row.get('flops_per_s'), 1e-9):>8} {f(mm, 1e-9):>10} "
                  f"{f(row.get('fraction_of_matmul'), 1):>6} {f(row['batched_matmul_flops_per_s'], 1e-9):>11} "
                  f"{f(row.get('fraction_of_batched_matmul'), 1):>6}", flush=True)

    targets = compute_targets(rows)
    print("\ntargets (measured side by side in this run):")
    for t in targets.values():
        v = t["value"]
        print(f"  {t['description']}: {'-' if v is None else f'{v:.3g}'} (target {t['target']}) -> {t['status']}")
    config = {k: getattr(args, k) for k in ("T", "recurrent_T", "B", "H", "K", "V", "chunk_size", "reps")}
    config.update(dtype="float32", matmul=f"{MATMUL_N}^3 float32, best of reps, before and after each row",
                  batched_matmul=f"[{SMALL_BATCH}, 64, 64]x[{SMALL_BATCH}, 64, 64] float32 HIGHEST, best of reps, "
                                 "before and after each row (the chunk path's product shape)",
                  timing="best of reps after one warm-up call, jax.block_until_ready",
                  fwd_bwd="jax.value_and_grad of <o, do> w.r.t. q, k, v, g (a training step: the output is computed)",
                  flops="forward 2*(C*(K+V) + 2*K*V) per token and head; fwd+bwd 3x forward")
    path = common.write_results(args.name, config=config, seed=0, results=rows, out_dir=args.out, started=started,
                                extra={"targets": targets}, replace=args.replace)
    print(f"wrote {path}")
    return 0


def compute_targets(rows):
    """The issue-16 targets from the rows (``None``/"n/a" where a length was not measured)."""
    get = {(r["impl"], r["T"]): r for r in rows}

    def val(impl, T, key):
        r = get.get((impl, T))
        return None if r is None else r.get(key)

    def ratio(x, y):
        return None if x is None or y is None else x / y

    values = {
        "fraction_of_matmul_T8192": val("chunk", 8192, "fraction_of_matmul"),
        "scaling_T16384_over_T2048": ratio(val("chunk", 16384, "fwd_bwd_s"), val("chunk", 2048, "fwd_bwd_s")),
        "recurrent_over_chunk_T4096": ratio(val("recurrent", 4096, "fwd_bwd_s"), val("chunk", 4096, "fwd_bwd_s")),
        "bwd_over_fwd_T8192": val("chunk", 8192, "bwd_over_fwd"),
    }
    return bench_ops.judge_targets(TARGETS, values)


if __name__ == "__main__":
    sys.exit(main())
