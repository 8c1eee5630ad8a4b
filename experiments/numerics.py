"""Experiment 5: numerics report. Error of the GLA operator's forms against a float64 recurrence.

For each gate regime (how strongly the forget gates decay per step), sequence length and input dtype, random
inputs are rounded to the dtype, and the outputs and gradients of

  * ``chunk``     gla(..., impl="chunk")               the two-level chunkwise JAX form
  * ``triton``    gla(..., impl="triton")              the Pallas Triton kernels (interpret mode off GPU)
  * ``recurrent`` gla(..., impl="recurrent")           the float32 scan (a floor: what float32 state costs)
  * ``fla_naive`` fla.ops.gla.naive.naive_recurrent_gla (torch, float32), when torch and fla import

are compared with a float64 recurrence (numpy, written here; forward and hand-derived backward) run on the same
rounded inputs. Errors are relative RMS errors ``||x - ref|| / ||ref||`` (fla's test metric; its own tolerance for
chunk vs naive in bf16 is about 4e-3..5e-3).

    python experiments/numerics.py                 # CPU default (a few minutes)
    python experiments/numerics.py --smoke         # seconds
    python experiments/numerics.py --lengths 1024 4096 16384 --triton-max-len 16384   # on a GPU
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

# Gate regimes: log forget gates g <= 0 per step and key channel.
GATES = {
    "none": "g = 0 (no decay: plain linear attention)",
    "layer": "g = log_sigmoid(z) / 16, z ~ N(0, 1) (the GLA layer's gate; about -0.05 per step)",
    "unit": "g = log_sigmoid(z), z ~ N(0, 1) (about -0.8 per step)",
    "strong": "g = 4 log_sigmoid(z), z ~ N(0, 1) (about -3 per step)",
    "extreme": "g ~ U(-20, 0) per step (the operator's stated limit)",
}
IMPLS = ("chunk", "triton", "recurrent", "fla_naive")


def make_gates(rng: np.random.Generator, regime: str, shape) -> np.ndarray:
    """float64 log gates of ``shape`` for ``regime`` (a key of GATES)."""
    if regime not in GATES:
        raise ValueError(f"regime: expected one of {tuple(GATES)}, got {regime!r}")
    if regime == "none":
        return np.zeros(shape)
    if regime == "extreme":
        return -20.0 * rng.random(shape)
    z = rng.standard_normal(shape)
    logsig = -np.logaddexp(0.0, -z)
    return {"layer": logsig / 16.0, "unit": logsig, "strong": 4.0 * logsig}[regime]


# ----------------------------------------------------------------------------------------------------------------
# The float64 reference (numpy).


def recurrence_f64(q, k, v, g, scale, do=None, block: int = 64):
    """float64 GLA recurrence over [B, T, H, K] / [B, T, H, V] numpy arrays, zero initial state.

    Returns o [B, T, H, V] and, when the output cotangent ``do`` is given, also (dq, dk, dv, dg). The backward
    recomputes states from checkpoints every ``block`` steps (memory O(T/block) states).
      S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t;  o_t = scale q_t S_t
      dS_t (accumulated backwards) = scale q_t^T do_t + diag(exp(g_{t+1})) dS_{t+1}
      dq_t = scale S_t do_t, dk_t = dS_t v_t, dv_t = k_t dS_t, dg_t = exp(g_t) * sum_v dS_t * S_{t-1}
    """
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    B, T, H, K = q.shape
    V = v.shape[-1]
    a = np.exp(g)
    S = np.zeros((B, H, K, V))
    o = np.empty((B, T, H, V))
    ckpt = {}
    for t in range(T):
        if t % block == 0:
            ckpt[t] = S.copy()  # the state before step t
        S = a[:, t, :, :, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    if do is None:
        return o
    do = np.asarray(do, np.float64)
    dq, dk, dv, dg = (np.empty_like(x) for x in (q, k, v, g))
    dS = np.zeros((B, H, K, V))
    for start in range(((T - 1) // block) * block, -1, -block):
        stop = min(start + block, T)
        states = [ckpt[start]]  # states[i] = state before step start + i
        for t in range(start, stop):
            states.append(a[:, t, :, :, None] * states[-1] + k[:, t, :, :, None] * v[:, t, :, None, :])
        for t in range(stop - 1, start - 1, -1):
            S_t, S_prev = states[t - start + 1], states[t - start]
            dS = dS + scale * q[:, t, :, :, None] * do[:, t, :, None, :]
            dq[:, t] = scale * np.einsum("bhkv,bhv->bhk", S_t, do[:, t])
            dk[:, t] = np.einsum("bhkv,bhv->bhk", dS, v[:, t])
            dv[:, t] = np.einsum("bhk,bhkv->bhv", k[:, t], dS)
            dg[:, t] = a[:, t] * np.einsum("bhkv,bhkv->bhk", dS, S_prev)
            dS = a[:, t, :, :, None] * dS
    return o, (dq, dk, dv, dg)


def rel_rms(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64; inf when x has non-finite entries."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


# ----------------------------------------------------------------------------------------------------------------
# The forms under test.


def triton_available() -> bool:
    try:
        from gla_jax.kernels import chunk_gla  # noqa: F401
    except ImportError:
        return False
    return True


def chunk_available() -> bool:
    try:
        import gla_jax.ops.chunk  # noqa: F401
    except ImportError:
        return False
    return True


def fla_available() -> bool:
    try:
        import torch  # noqa: F401
        from fla.ops.gla.naive import naive_recurrent_gla  # noqa: F401
    except Exception:  # noqa: BLE001 (fla may fail to import in many ways without a GPU)
        return False
    return True


_JAX_FNS = {}


def _jax_fn(impl: str):
    """A jitted (o, (dq, dk, dv, dg)) function of (q, k, v, g, do) for a JAX form."""
    if impl in _JAX_FNS:
        return _JAX_FNS[impl]
    import jax

    from gla_jax.ops import gla

    interpret = impl == "triton" and jax.default_backend() != "gpu"  # the kernels off a GPU: interpret mode

    def fwd(q, k, v, g):
        return gla(q, k, v, g, impl=impl, interpret=interpret)[0]

    @jax.jit
    def f(q, k, v, g, do):
        o, vjp = jax.vjp(fwd, q, k, v, g)
        return o, vjp(do.astype(o.dtype))

    _JAX_FNS[impl] = f
    return f


def run_jax(impl, q, k, v, g, do, dtype):
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    args = [jnp.asarray(x, dtype=dt) for x in (q, k, v, g)]
    o, grads = jax.device_get(_jax_fn(impl)(*args, jnp.asarray(do, dt)))
    return np.asarray(o, np.float64), tuple(np.asarray(x, np.float64) for x in grads)


def run_fla(q, k, v, g, dtype):
    import torch
    from fla.ops.gla.naive import naive_recurrent_gla

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    to = lambda x: torch.from_numpy(np.asarray(x, np.float32)).to(tdt)
    with torch.no_grad():
        o, _ = naive_recurrent_gla(to(q), to(k), to(v), to(g))
    return o.float().numpy().astype(np.float64)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back to float64 (so the reference sees exactly the tested inputs)."""
    import jax.numpy as jnp

    return np.asarray(jnp.asarray(np.asarray(x, np.float32), jnp.dtype(dtype)).astype(jnp.float32), np.float64)


def run(args) -> dict:
    started = C.utc_now()
    impls = [i for i in args.impls]
    skipped = {}
    if "chunk" in impls and not chunk_available():
        skipped["chunk"] = "gla_jax.ops.chunk not importable"
    if "triton" in impls and not triton_available():
        skipped["triton"] = "gla_jax.kernels.triton not importable"
    if "fla_naive" in impls and not fla_available():
        skipped["fla_naive"] = "torch / fla not importable"
    impls = [i for i in impls if i not in skipped]
    for name, why in skipped.items():
        print(f"  skipping {name}: {why}")
    rows = []
    B, H, K, V = args.batch, args.heads, args.head_k, args.head_v
    for T in args.lengths:
        for regime in args.gates:
            rng = np.random.default_rng([args.seed, T, list(GATES).index(regime)])
            raw = [rng.standard_normal((B, T, H, K)), rng.standard_normal((B, T, H, K)),
                   rng.standard_normal((B, T, H, V)), make_gates(rng, regime, (B, T, H, K))]
            do_raw = rng.standard_normal((B, T, H, V))
            for dtype in args.dtypes:
                q, k, v, g = (round_to(x, dtype) for x in raw)
                g = np.minimum(g, 0.0)
                do = round_to(do_raw, dtype)
                o_ref, grads_ref = recurrence_f64(q, k, v, g, K ** -0.5, do=do)
                # The floor: the exact output rounded to the dtype (no form returning that dtype can do better).
                floor = rel_rms(round_to(o_ref, dtype), o_ref)
                for impl in impls:
                    if impl == "triton" and T > args.triton_max_len:
                        continue
                    if impl in ("recurrent", "fla_naive") and T > args.recurrent_max_len:
                        continue
                    row = {"impl": impl, "T": T, "gate": regime, "dtype": dtype, "o_floor": floor}
                    if impl == "fla_naive":
                        o = run_fla(q, k, v, g, dtype)
                        row.update(o_err=rel_rms(o, o_ref))
                    else:
                        o, grads = run_jax(impl, q, k, v, g, do, dtype)
                        row["o_err"] = rel_rms(o, o_ref)
                        for name, x, r in zip(("dq", "dk", "dv", "dg"), grads, grads_ref):
                            row[f"{name}_err"] = rel_rms(x, r)
                    row["finite"] = bool(np.isfinite(o).all())
                    rows.append(row)
                    print("  " + "  ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in row.items()), flush=True)
    config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    config["gate_regimes"] = {r: GATES[r] for r in args.gates}
    path = C.write_results(args.name, config=config, seed=args.seed, results=rows, out_dir=args.out,
                           started=started, extra={"skipped": skipped}, replace=True)
    print(C.format_table(rows, ["impl", "dtype", "gate", "T", "o_floor", "o_err", "dq_err", "dk_err", "dv_err", "dg_err"],
                         floatfmt=".2e"))
    if not args.no_plot and rows:
        plot(rows, args.out, args.name)
    return {"json": path, "rows": rows, "skipped": skipped}


def plot(rows, out_dir, name):
    plt = C.pyplot()
    dtypes = sorted({r["dtype"] for r in rows})
    gates = [g for g in GATES if any(r["gate"] == g for r in rows)]
    fig, axes = plt.subplots(len(dtypes), len(gates), figsize=(3.2 * len(gates), 3.0 * len(dtypes)), squeeze=False,
                             sharey=True)
    for i, dt in enumerate(dtypes):
        for j, gate in enumerate(gates):
            ax = axes[i][j]
            for impl in IMPLS:
                pts = sorted((r["T"], r["o_err"]) for r in rows
                             if r["impl"] == impl and r["dtype"] == dt and r["gate"] == gate)
                if pts:
                    ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], marker="o", label=impl)
                pts = sorted((r["T"], r["dg_err"]) for r in rows
                             if r["impl"] == impl and r["dtype"] == dt and r["gate"] == gate and "dg_err" in r)
                if pts:
                    ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], marker="x", ls=":",
                            label=f"{impl} (dg)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{dt}, gate '{gate}'", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("rel. RMS error vs float64")
    axes[0][-1].legend(fontsize=7)
    return C.save_figure(fig, out_dir, name)


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 256, 1024, 4096])
    p.add_argument("--gates", nargs="+", default=list(GATES), choices=list(GATES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-k", type=int, default=64)
    p.add_argument("--head-v", type=int, default=64)
    p.add_argument("--triton-max-len", "--pallas-max-len", type=int, default=1024,
                   help="longest T for the Triton kernels (interpreted off a GPU)")
    p.add_argument("--recurrent-max-len", type=int, default=4096, help="longest T for the sequential forms")
    p.add_argument("--name", default="numerics", help="results file stem")
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.gates, args.heads, args.head_k, args.head_v = [64], ["layer", "extreme"], 1, 16, 16
        args.impls = [i for i in args.impls if i != "triton"] if not triton_available() else args.impls
        args.name = args.name if args.name != "numerics" else "numerics_smoke"
    for T in args.lengths:
        if T < 1:
            raise ValueError(f"--lengths: expected positive lengths, got {T}")
    return args


def main(argv=None):
    args = parse_args(argv)
    C.refuse_overwrite(args.out, args.name, args.replace or args.smoke)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
