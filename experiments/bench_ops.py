"""Operator benchmark: every registered GLA backend (chunk, recurrent, parallel, triton, ...) against causal softmax attention.

    python experiments/bench_ops.py --quick     # ~1-2 minutes on 2 CPU cores (results/bench_ops_<backend>_quick.json)
    python experiments/bench_ops.py             # T = 512 .. 16384
    gla-jax bench ...                           # the same

Times forward and forward+backward of every registered GLA backend (chunk, recurrent, parallel, triton, ...) and of
causal softmax attention (``jax.nn.dot_product_attention``) side by side in one process, for a list of sequence
lengths; prints a table, writes JSON, and checks the operator's speed targets:

  1. chunk fwd+bwd <= 0.05 x causal softmax attention at T = 8192;
  2. chunk fwd+bwd time(T = 16384) / time(T = 2048) <= 10;
  3. chunk fwd+bwd at least 10x faster than recurrent at T = 4096.

Timing: ``jax.block_until_ready``, one warm-up call (compilation) excluded, median of ``--reps`` calls.

Results never overwrite an earlier file by accident: the default is ``experiments/results/bench_ops_<backend>.json``
(``..._quick.json`` with ``--quick``), and when that exists a new file with the UTC time in its name is written
instead, unless ``--replace``; an explicit ``--out`` that exists is refused unless ``--replace``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

from gla_jax.ops import registry  # imports jax, but initializes no platform

QUICK_T = (256, 1024, 2048)
DEFAULT_T = (512, 1024, 2048, 4096, 8192, 16384)
#: Every registered operator backend (gla_jax.ops.registry; kernels off their platform run in interpret mode), then
#: softmax attention.
IMPLS = (*registry.names(), "attention")
TARGETS = (
    ("chunk_vs_attention_T8192", "chunk fwd+bwd / attention fwd+bwd at T=8192", "<=", 0.05),
    ("chunk_scaling_T16384_over_T2048", "chunk fwd+bwd time(T=16384) / time(T=2048)", "<=", 10.0),
    ("recurrent_over_chunk_T4096", "recurrent fwd+bwd / chunk fwd+bwd at T=4096", ">=", 10.0),
)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gla-jax bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=None, help=f"sequence lengths (default {DEFAULT_T})")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--V", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--reps", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument("--out", default=None, help="JSON path (default experiments/results/bench_ops_<backend>[_quick].json"
                                               ", or a timestamped name beside it when that exists)")
    p.add_argument("--replace", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--device", choices=["cpu", "gpu"], default=None, help="JAX platform (default: JAX's default)")
    p.add_argument("--quick", action="store_true", help=f"T in {QUICK_T}, 2 reps: about 1-2 minutes on 2 CPU cores")
    p.add_argument("--parallel-max-T", type=int, default=None,
                   help="largest T for the parallel form, whose [B, T, T, H, K] decay tensor is huge (default 512; "
                        "256 with --quick)")
    p.add_argument("--recurrent-max-T", type=int, default=None,
                   help="largest T for the recurrent form (slow backward; default 4096, 1024 with --quick)")
    p.add_argument("--attention-max-T", type=int, default=8192,
                   help="largest T for softmax attention (its T x T scores need B*H*T^2*4 bytes, several times)")
    p.add_argument("--interpret-max-T", type=int, default=512,
                   help="largest T for a kernel backend in interpret mode (off its platform)")
    p.add_argument("--no-matmul-peak", action="store_true", help="skip the reference matmul")
    args = p.parse_args(argv)
    if args.quick:
        args.T = args.T or list(QUICK_T)
        args.reps = min(args.reps, 2)
    if args.parallel_max_T is None:
        args.parallel_max_T = 256 if args.quick else 512
    if args.recurrent_max_T is None:
        args.recurrent_max_T = 1024 if args.quick else 4096
    args.T = sorted(set(args.T or DEFAULT_T))
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    args.impls = [registry.get(s).name if s in registry.choices() else s for s in args.impls]  # aliases
    unknown = [s for s in args.impls if s not in IMPLS]
    if unknown:
        p.error(f"--impls: unknown {unknown}; expected a subset of {IMPLS}")
    if min(args.T) < 1 or min(args.B, args.H, args.K, args.V, args.reps) < 1:
        p.error("--T, --B, --H, --K, --V and --reps must be >= 1")
    if args.out and pathlib.Path(args.out).exists() and not args.replace:
        p.error(f"--out: {args.out} exists; pass another path, or --replace to overwrite it")
    return args


RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def output_path(args, backend: str, now: datetime.datetime | None = None) -> pathlib.Path:
    """``--out``, or ``results/bench_ops_<backend>[_quick].json``; when that default exists and ``--replace`` is not
    given, ``..._<YYYYmmddTHHMMSSZ>.json`` beside it (a committed result is only replaced on purpose)."""
    if args.out:
        return pathlib.Path(args.out)
    stem = f"bench_ops_{backend}" + ("_quick" if args.quick else "")
    path = RESULTS / f"{stem}.json"
    if path.exists() and not args.replace:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        path = RESULTS / f"{stem}_{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    return path


def _time(fn, args, reps):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def _peak_memory(device):
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def chunk_flops(B, T, H, K, V, C=64, c=16):
    """Model FLOPs of one chunk forward (matmuls at 2 per multiply-add, the diagonal sub-blocks at ~3 per entry).

    Per position: state contribution and inter-chunk term 2*K*V each, A v over the full chunk 2*C*V, the
    off-diagonal sub-chunk blocks 2*K*(C - c)/2, the diagonal blocks 3*K*(c + 1)/2. The backward is counted as 2x.
    """
    per_pos = 4 * K * V + 2 * C * V + K * (C - c) + 1.5 * K * (c + 1)
    return B * H * T * per_pos


def _matmul_peak(jax, jnp, n=2048, reps=3):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    t, _ = _time(f, (a, a), reps)
    return 2 * n**3 / t


def _make_fns(impl, jax, jnp, T, interpret):
    from gla_jax.ops import gla

    if impl == "attention":
        def fwd(q, k, v, g):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)

        def fb(q, k, v, g, do):
            o, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), q, k, v)
            return vjp(do)
    else:
        def run(q, k, v, g):
            return gla(q, k, v, g, impl=impl, interpret=interpret)[0]

        fwd = run

        def fb(q, k, v, g, do):
            o, vjp = jax.vjp(run, q, k, v, g)
            return vjp(do.astype(o.dtype))
    return jax.jit(fwd), jax.jit(fb)


def _skip_reason(impl, T, args, backend):
    if impl == "parallel" and T > args.parallel_max_T:
        return f"T > --parallel-max-T {args.parallel_max_T} (O(T^2 K) memory and time)"
    if impl == "recurrent" and T > args.recurrent_max_T:
        return f"T > --recurrent-max-T {args.recurrent_max_T}"
    if impl == "attention" and T > args.attention_max_T:
        return f"T > --attention-max-T {args.attention_max_T} (T x T scores)"
    if _interpret(impl, backend) and T > args.interpret_max_T:
        return f"interpret mode on {backend}: only T <= --interpret-max-T {args.interpret_max_T}"
    return None


def _interpret(impl, platform):
    """A kernel backend off its platforms runs in Pallas interpret mode (not a speed path)."""
    if impl not in registry.names():
        return False
    b = registry.get(impl)
    return not b.pure_jax and not b.runs_on(platform)


def compute_targets(rows):
    fb = {(r["impl"], r["T"]): r["fwd_bwd_s"] for r in rows if r.get("fwd_bwd_s") is not None and not r.get("note")}

    def ratio(a, b):
        return None if a is None or b is None else a / b

    values = {
        "chunk_vs_attention_T8192": ratio(fb.get(("chunk", 8192)), fb.get(("attention", 8192))),
        "chunk_scaling_T16384_over_T2048": ratio(fb.get(("chunk", 16384)), fb.get(("chunk", 2048))),
        "recurrent_over_chunk_T4096": ratio(fb.get(("recurrent", 4096)), fb.get(("chunk", 4096))),
    }
    return judge_targets(TARGETS, values)


def judge_targets(targets, values):
    """{key: {description, value, target, status}} for ``targets`` ((key, text, "<=" or ">=", bound), ...) and the
    measured ``values`` {key: float or None}; status PASS/FAIL, or "n/a (not measured)" for a None value."""
    out = {}
    for key, text, op, bound in targets:
        val = values[key]
        ok = None if val is None else (val <= bound if op == "<=" else val >= bound)
        out[key] = {"description": text, "value": val, "target": f"{op} {bound}",
                    "status": "n/a (not measured)" if ok is None else ("PASS" if ok else "FAIL")}
    return out


def _fmt(x, unit=""):
    if x is None:
        return "-"
    return f"{x:.4g}{unit}"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    import jax
    import jax.numpy as jnp

    if args.device:  # before the first use of a platform
        jax.config.update("jax_platforms", args.device if args.device != "gpu" else "cuda,gpu")

    backend = jax.default_backend()
    device = jax.devices()[0]
    dtype = jnp.dtype(args.dtype)
    B, H, K, V = args.B, args.H, args.K, args.V
    out = output_path(args, backend)
    print(f"gla-jax bench: backend={backend} device={device.device_kind} B={B} H={H} K={K} V={V} dtype={args.dtype} "
          f"T={args.T} impls={args.impls} reps={args.reps}", flush=True)
    peak = None if args.no_matmul_peak else _matmul_peak(jax, jnp)
    if peak:
        print(f"reference matmul (2048^3 float32): {peak / 1e9:.1f} GFLOP/s", flush=True)

    rows = []
    header = f"{'impl':<10} {'T':>6} {'fwd ms':>10} {'fwd+bwd ms':>11} {'GFLOP/s':>8} {'%mm':>5} {'peak MiB':>9}  note"
    print(header, flush=True)
    for T in args.T:
        key = jax.random.split(jax.random.PRNGKey(T), 5)
        q = jax.random.normal(key[0], (B, T, H, K), jnp.float32).astype(dtype)
        k = jax.random.normal(key[1], (B, T, H, K), jnp.float32).astype(dtype)
        v = jax.random.normal(key[2], (B, T, H, V), jnp.float32).astype(dtype)
        g = (jax.nn.log_sigmoid(jax.random.normal(key[3], (B, T, H, K), jnp.float32) + 2.0) / 16).astype(dtype)
        do = jax.random.normal(key[4], (B, T, H, V), jnp.float32).astype(dtype)
        for impl in args.impls:
            row = {"impl": impl, "T": T, "B": B, "H": H, "K": K, "V": V, "dtype": args.dtype}
            reason = _skip_reason(impl, T, args, backend)
            if reason:
                row["skipped"] = reason
                rows.append(row)
                print(f"{impl:<10} {T:>6} {'':>10} {'':>11} {'':>8} {'':>5} {'':>9}  skipped: {reason}", flush=True)
                continue
            interpret = _interpret(impl, backend)
            if interpret:
                row["note"] = "interpret (not a speed path)"
            if impl == "attention" and K != V:
                row["skipped"] = "attention needs K == V"
                rows.append(row)
                continue
            try:
                fwd, fb = _make_fns(impl, jax, jnp, T, interpret)
                t_f, c_f = _time(fwd, (q, k, v, g), args.reps)
                t_fb, c_fb = _time(fb, (q, k, v, g, do), args.reps)
            except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(f"{impl:<10} {T:>6}  error: {row['error']}", flush=True)
                continue
            row.update(fwd_s=t_f, fwd_bwd_s=t_fb, first_fwd_call_s=c_f, first_fwd_bwd_call_s=c_fb,
                       peak_bytes=_peak_memory(device))
            if impl == "chunk":
                flops = 3 * chunk_flops(B, T, H, K, V)
                row["model_flops_fwd_bwd"] = flops
                row["achieved_flops_per_s"] = flops / t_fb
                row["fraction_of_matmul_peak"] = (flops / t_fb / peak) if peak else None
            rows.append(row)
            gf = row.get("achieved_flops_per_s")
            frac = row.get("fraction_of_matmul_peak")
            mem = row["peak_bytes"]
            print(f"{impl:<10} {T:>6} {t_f * 1e3:>10.2f} {t_fb * 1e3:>11.2f} {_fmt(gf and gf / 1e9):>8} "
                  f"{_fmt(frac and 100 * frac):>5} {_fmt(mem and mem / 2**20):>9}  {row.get('note', '')}", flush=True)

    targets = compute_targets(rows)
    print("\ntargets (measured side by side in this run):")
    for key, t in targets.items():
        print(f"  {t['description']}: {_fmt(t['value'])} (target {t['target']}) -> {t['status']}")
    result = {
        "benchmark": "bench_ops",
        "config": {"B": B, "H": H, "K": K, "V": V, "dtype": args.dtype, "T": args.T, "impls": args.impls,
                   "reps": args.reps, "quick": args.quick, "parallel_max_T": args.parallel_max_T,
                   "recurrent_max_T": args.recurrent_max_T, "attention_max_T": args.attention_max_T,
                   "timing": "median of reps after one warm-up call, jax.block_until_ready"},
        "env": {"jax": jax.__version__, "backend": backend, "device_kind": device.device_kind,
                "cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "matmul_peak_flops_per_s": peak,
        "rows": rows,
        "targets": targets,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
