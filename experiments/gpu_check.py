"""Does the Pallas GLA kernel work on this GPU, and how fast is it?

    python experiments/gpu_check.py --out experiments/results/gpu/<run>      # on one H100/H200, a few minutes
    python experiments/gpu_check.py --interpret --out /tmp/gpu_check          # CPU, tiny sizes (CI)

(a) compiles ``gla_jax.kernels.triton.chunk_gla`` and checks forward and gradients (q, k, v, g, initial_state, with
    packed documents) against ``gla(impl="chunk")`` in float32 and bfloat16;
(b) times forward and forward+backward of the Pallas kernel, ``impl="chunk"`` under XLA, cuDNN flash attention
    (``jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")``) and, when torch and fla import
    with CUDA, fla's Triton ``chunk_gla``, at B=4, H=16, D=128 for T in 2K/4K/8K/16K;
(c) prints a table and writes ``gpu_check.json`` and ``gpu_check.png`` (when matplotlib imports) into --out with the
    device name, package versions and the targets (Pallas fwd+bwd <= 1.0x fla and <= 0.6x cuDNN at T >= 8K);
(d) with the time left (``--tune-budget-s``), times Pallas fwd+bwd under a few other tilings (warps, pipeline
    stages, dq/dk K tile) at T=8K, so one run also says whether the defaults are the best of these;
(e) on a Hopper GPU (compute capability >= 9.0) or in interpret mode, checks the Mosaic GPU kernels
    (``gla_jax.kernels.mosaic_gpu``, bf16, vs ``impl="chunk"``) and times them at the same sizes as (b), with their
    goals (fwd+bwd <= 0.7x fla at T >= 4K, <= 0.5x cuDNN at 8K); ``--mosaic-budget-s 0`` skips it.

Needs jax and numpy only (no grain/optax/orbax); everything else is optional. Interpret mode is not a speed path:
its timings only show that the code runs.
"""

from __future__ import annotations

import os

# Leave GPU memory for torch/fla: jax would otherwise reserve most of it at start-up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import platform
import statistics
import sys
import time
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_T = 8192
TARGET_VS_FLA = 1.0
TARGET_VS_CUDNN = 0.6
TOL = {"float32": 1e-4, "bfloat16": 3e-3}  # every output and gradient (the bounds, as in tests/test_kernels.py)


def _ensure_importable():
    """Makes ``gla_jax`` and ``gla_jax.kernels`` importable from a plain checkout (no ``pip install -e .``)."""
    try:
        import gla_jax.kernels  # noqa: F401
        return
    except ImportError:
        pass
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import gla_jax

    if "gla_jax.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "gla_jax.kernels", os.path.join(REPO, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(REPO, "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["gla_jax.kernels"] = module
        spec.loader.exec_module(module)
        gla_jax.kernels = module


def versions():
    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "numpy", "torch", "triton",
                 "flash-linear-attention", "matplotlib"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _inputs(B, T, H, K, V, dtype, seed=0):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), dtype)
    g = jnp.asarray(-np.logaddexp(0.0, -2.0 * rng.standard_normal((B, T, H, K))) / 16.0, dtype)
    return q, k, v, g, rng


# ------------------------------------------------------------------------------------------------ (a) checks


def correctness_entry(kernel, *, B, T, H, K, V, dtype, seed, tol):
    """One correctness entry of a kernel: ``kernel(q, k, v, g, initial_state=h0, output_final_state=True,
    segment_ids=seg)`` (a ``chunk_gla`` with its own options bound; 3 documents per row) vs ``impl="chunk"`` in
    float32 from the same rounded inputs: output, final state and every gradient; ok when all are finite and every
    relative error is <= ``tol``. An exception is reported in the entry, not raised."""
    import jax
    import jax.numpy as jnp

    from gla_jax.ops import gla

    q, k, v, g, rng = _inputs(B, T, H, K, V, dtype, seed=seed)
    h0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    seg = np.zeros((B, T), np.int32)
    seg[:, T // 3:] = 1
    seg[:, (2 * T) // 3:] = 2
    kw = dict(output_final_state=True, segment_ids=jnp.asarray(seg))
    do = jnp.asarray(rng.standard_normal((B, T, H, V)), dtype)
    dst = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)

    def run(fn, *args):
        (o, s), vjp = jax.vjp(fn, *args)
        return (o, s) + tuple(vjp((do.astype(o.dtype), dst)))

    entry = {"dtype": jnp.dtype(dtype).name, "shape": dict(B=B, T=T, H=H, K=K, V=V)}
    try:
        t0 = time.perf_counter()
        got = jax.block_until_ready(jax.jit(lambda *a: run(lambda q, k, v, g, h: kernel(
            q, k, v, g, initial_state=h, **kw), *a))(q, k, v, g, h0))
        entry["compile_and_run_s"] = round(time.perf_counter() - t0, 2)
        f32 = lambda x: x.astype(jnp.float32)
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(lambda *a: run(lambda q, k, v, g, h: gla(q, k, v, g, impl="chunk", initial_state=h, **kw),
                                         *a))(f32(q), f32(k), f32(v), f32(g), h0)
        errs = {n: rel_err(a, b) for n, a, b in zip(("o", "final_state", "dq", "dk", "dv", "dg", "dh0"), got, ref)}
        entry["rel_err"] = errs
        entry["tolerance"] = {n: tol for n in errs}
        entry["finite"] = bool(all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in got))
        entry["ok"] = entry["finite"] and all(errs[n] <= tol for n in errs)
    except Exception as e:  # noqa: BLE001 - report, keep going
        entry["ok"] = False
        entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
    return entry


def check_correctness(*, B, T, H, K, V, interpret):
    """Triton kernels vs impl="chunk" (float32 reference from the same rounded inputs), forward and all gradients,
    in float32 and bfloat16."""
    import jax.numpy as jnp

    from gla_jax.kernels import chunk_gla

    return [correctness_entry(functools.partial(chunk_gla, interpret=interpret), B=B, T=T, H=H, K=K, V=V,
                              dtype=dtype, seed=1, tol=TOL[jnp.dtype(dtype).name])
            for dtype in (jnp.float32, jnp.bfloat16)]


# ------------------------------------------------------------------------------------------------ (b) timing


def _time_jax(fn, args, iters, warmup):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, first


def time_modes(name, T, fwd, fwdbwd, inputs, do, rows, skipped, *, iters, warmup, deadline):
    """Times ``fwd(*inputs)`` and ``fwdbwd(*inputs, do)`` of implementation ``name`` at length T, appending a row
    {impl, T, mode, ms, first_call_s} to ``rows`` for each, or to ``skipped`` the reason it was not timed (past
    ``deadline``, an exception); prints one line per mode."""
    for mode, fn, args in (("fwd", fwd, tuple(inputs)), ("fwdbwd", fwdbwd, (*inputs, do))):
        if time.perf_counter() > deadline:
            skipped.append({"impl": name, "T": T, "mode": mode, "reason": "time budget spent"})
            continue
        ms = float("nan")
        try:
            ms, first = _time_jax(fn, args, iters, warmup)
            rows.append({"impl": name, "T": T, "mode": mode, "ms": round(ms, 4), "first_call_s": round(first, 2)})
        except Exception as e:  # noqa: BLE001
            skipped.append({"impl": name, "T": T, "mode": mode, "reason": f"{type(e).__name__}: {e}"[:500]})
        print(f"  T={T:6d} {name:16s} {mode:7s} {ms:10.3f} ms", flush=True)


def _fwdbwd(f):
    """(q, k, v, g, do) -> the gradients of f(q, k, v, g) in q, k, v and g for the output cotangent do."""
    import jax

    def fwdbwd(q, k, v, g, do):
        o, vjp = jax.vjp(f, q, k, v, g)
        return vjp(do.astype(o.dtype))

    return fwdbwd


def _jax_impls(interpret, on_gpu):
    import jax
    import jax.numpy as jnp

    from gla_jax.kernels import chunk_gla
    from gla_jax.ops import gla

    impls = {
        "triton": lambda q, k, v, g: chunk_gla(q, k, v, g, interpret=interpret)[0],
        "chunk_xla": lambda q, k, v, g: gla(q, k, v, g, impl="chunk")[0],
    }
    if on_gpu:
        impls["cudnn_attention"] = lambda q, k, v, g: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    out = {}
    for name, f in impls.items():
        if name == "cudnn_attention":  # no gate: differentiate q, k, v only (no zero cotangent for g)
            def fwdbwd(q, k, v, g, do, f=f):
                o, vjp = jax.vjp(lambda q, k, v: f(q, k, v, g), q, k, v)
                return vjp(do.astype(o.dtype))
        else:
            fwdbwd = _fwdbwd(f)
        out[name] = (jax.jit(f), jax.jit(fwdbwd))
    del jnp
    return out


def _fla_impl():
    """(fwd, fwdbwd) callables over numpy inputs for fla's Triton chunk_gla, or a reason why not."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return None, f"torch not importable ({type(e).__name__})"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA device"
    try:
        from fla.ops.gla import chunk_gla as fla_chunk_gla
    except Exception as e:  # noqa: BLE001
        return None, f"fla not importable ({type(e).__name__}: {e})"[:300]
    return (torch, fla_chunk_gla), None


def _time_fla(torch, fla_chunk_gla, arrays, iters, warmup):
    dev = "cuda"
    q, k, v, g, do = (torch.from_numpy(np.asarray(a, np.float32)).to(dev, torch.bfloat16) for a in arrays)
    q, k, v, g = (x.requires_grad_(True) for x in (q, k, v, g))

    def fwd():
        with torch.no_grad():
            return fla_chunk_gla(q, k, v, g)[0]

    def fwdbwd():
        for x in (q, k, v, g):
            x.grad = None
        o = fla_chunk_gla(q, k, v, g)[0]
        o.backward(do)

    res = {}
    for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res[name] = (statistics.median(times) * 1e3, first)
    del q, k, v, g, do
    torch.cuda.empty_cache()
    return res


def benchmark(*, B, H, D, Ts, dtype_name, interpret, on_gpu, iters, warmup, deadline):
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)
    rows, skipped = [], []
    impls = _jax_impls(interpret, on_gpu)
    fla, fla_reason = _fla_impl()
    if fla is None:
        skipped.append({"impl": "fla_chunk_gla", "reason": fla_reason})
    if not on_gpu:
        skipped.append({"impl": "cudnn_attention", "reason": "no GPU (cuDNN attention needs CUDA)"})
    for T in sorted(Ts, reverse=True):  # longest first: the targets are at T >= 8K if the budget runs out
        q, k, v, g, rng = _inputs(B, T, H, D, D, dtype, seed=2)
        do = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
        for name, (fwd, fwdbwd) in impls.items():
            time_modes(name, T, fwd, fwdbwd, (q, k, v, g), do, rows, skipped, iters=iters, warmup=warmup,
                       deadline=deadline)
        if fla is not None:
            if time.perf_counter() > deadline:
                skipped.append({"impl": "fla_chunk_gla", "T": T, "reason": "time budget spent"})
                continue
            try:
                res = _time_fla(*fla, [np.asarray(x.astype(jnp.float32)) for x in (q, k, v, g, do)], iters, warmup)
                for mode, (ms, first) in res.items():
                    rows.append({"impl": "fla_chunk_gla", "T": T, "mode": mode, "ms": round(ms, 4),
                                 "first_call_s": round(first, 2)})
                    print(f"  T={T:6d} {'fla_chunk_gla':16s} {mode:7s} {ms:10.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001
                skipped.append({"impl": "fla_chunk_gla", "T": T, "reason": f"{type(e).__name__}: {e}"[:500]})
        del q, k, v, g, do
    del jax
    return rows, skipped


#: Tilings that (d) compares with the default (num_warps=None: 4 for bf16 matmuls): chunk_gla keyword arguments.
TILINGS = (
    {},
    {"num_warps": 8},
    {"num_stages": 3},
    {"block_k_bwd": 64},
    {"num_warps": 8, "block_k_bwd": 64},
    {"block_v": 128},
)


def tune(*, B, H, D, T, dtype_name, interpret, iters, deadline, tilings=TILINGS):
    """Pallas fwd+bwd time under each tiling of ``tilings`` (until ``deadline``): (rows, skipped)."""
    import jax
    import jax.numpy as jnp

    from gla_jax.kernels import chunk_gla

    q, k, v, g, rng = _inputs(B, T, H, D, D, jnp.dtype(dtype_name), seed=3)
    do = jnp.asarray(rng.standard_normal((B, T, H, D)), q.dtype)
    rows, skipped = [], []
    for tiling in tilings:
        name = ",".join(f"{key}={val}" for key, val in tiling.items()) or "default"
        if time.perf_counter() > deadline:
            skipped.append({"tiling": name, "reason": "time budget spent"})
            continue
        fwdbwd = _fwdbwd(lambda *a, tiling=tiling: chunk_gla(*a, interpret=interpret, **tiling)[0])
        try:
            ms, first = _time_jax(jax.jit(fwdbwd), (q, k, v, g, do), iters, warmup=1)
            rows.append({"tiling": name, "T": T, "ms": round(ms, 4), "first_call_s": round(first, 2)})
            print(f"  {name:32s} {ms:10.3f} ms (first call {first:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001
            skipped.append({"tiling": name, "reason": f"{type(e).__name__}: {e}"[:500]})
    return rows, skipped


def speed_target(ms, impl, other, T, limit, interpret):
    """One speed target: ``impl`` fwd+bwd <= ``limit`` x ``other`` at T, from ``ms`` ((impl, T, mode) -> ms); the
    ratio and whether it is met, or None with a note (interpret mode, a row not measured)."""
    p, o = ms.get((impl, T, "fwdbwd")), ms.get((other, T, "fwdbwd"))
    entry = {"T": T, "target": f"{impl} fwd+bwd <= {limit}x {other}", "limit": limit}
    if interpret:
        entry.update(ratio=None, met=None, note="interpret mode: not a speed path")
    elif p is None or o is None:
        entry.update(ratio=None, met=None, note="not measured")
    else:
        entry.update(ratio=round(p / o, 3), met=bool(p / o <= limit))
    return entry


def timings_by_key(rows):
    """(impl, T, mode) -> ms of the timing rows."""
    return {(r["impl"], r["T"], r["mode"]): r["ms"] for r in rows}


def evaluate_targets(rows, interpret):
    """Pallas fwd+bwd vs fla and vs cuDNN at every measured T >= 8K."""
    ms = timings_by_key(rows)
    out = [speed_target(ms, "triton", other, T, limit, interpret)
           for T in sorted({r["T"] for r in rows if r["T"] >= TARGET_T})
           for other, limit in (("fla_chunk_gla", TARGET_VS_FLA), ("cudnn_attention", TARGET_VS_CUDNN))]
    if not out:
        out.append({"target": f"triton fwd+bwd <= {TARGET_VS_FLA}x fla and <= {TARGET_VS_CUDNN}x cuDNN at "
                              f"T >= {TARGET_T}", "met": None, "note": f"no T >= {TARGET_T} measured"})
    return out


def print_correctness(entries, prefix=""):
    """One line per correctness entry: dtype, ok, the relative errors, the error if any."""
    for e in entries:
        print(f"  {prefix}{e['dtype']:9s} ok={e['ok']} "
              + " ".join(f"{k}={v:.2e}" for k, v in e.get("rel_err", {}).items())
              + (f" error={e['error']}" if "error" in e else ""), flush=True)


def print_targets(targets):
    for t in targets:
        print(f"  target {t.get('target')} T={t.get('T', '-')}: ratio={t.get('ratio')} met={t.get('met')}"
              + (f" ({t['note']})" if t.get("note") else ""))


def check_sizes(args, interpret, interpret_check):
    """(B, H, D, Ts, correctness sizes, iters) from the command line, with the defaults of interpret mode (tiny;
    ``interpret_check``: the correctness sizes) or of a real device."""
    if interpret:
        return (args.batch or 1, args.heads or 2, args.head_dim or 32, args.T or [128], interpret_check,
                args.iters or 1)
    return (args.batch or 4, args.heads or 16, args.head_dim or 128, args.T or [2048, 4096, 8192, 16384],
            dict(B=2, T=1000, H=4, K=128, V=128), args.iters or 10)


def check_parser(description, name, interpret_help):
    """The arguments both device checks take (``name``.json and ``name``.png go to --out)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help=f"output directory ({name}.json, {name}.png)")
    p.add_argument("--interpret", action="store_true", help=interpret_help)
    p.add_argument("--T", type=int, nargs="*", default=None, help="sequence lengths to time")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=270.0, help="stop timing new rows after this many seconds")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    return p


def report_saver(report, out_json, start):
    """A ``save()`` that writes ``report`` (with the elapsed time and the heavy modules imported) to ``out_json``,
    through a temporary file: never a half-written report."""

    def save():
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        report["heavy_modules_imported"] = sorted(m for m in ("grain", "optax", "orbax") if m in sys.modules)
        with open(out_json + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(out_json + ".tmp", out_json)

    return save


def table(rows):
    impls = sorted({r["impl"] for r in rows})
    Ts = sorted({r["T"] for r in rows})
    ms = {(r["impl"], r["T"], r["mode"]): r["ms"] for r in rows}
    lines = [f"{'impl':18s}" + "".join(f"{'T=' + str(T) + ' fwd':>14s}{'fwd+bwd':>10s}" for T in Ts)]
    for impl in impls:
        cells = ""
        for T in Ts:
            f, fb = ms.get((impl, T, "fwd")), ms.get((impl, T, "fwdbwd"))
            cells += f"{f:14.3f}" if f is not None else f"{'-':>14s}"
            cells += f"{fb:10.3f}" if fb is not None else f"{'-':>10s}"
        lines.append(f"{impl:18s}{cells}")
    return "\n".join(lines) + "\n(milliseconds, median)"


def plot(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
        for impl in sorted({r["impl"] for r in rows}):
            pts = sorted((r["T"], r["ms"]) for r in rows if r["impl"] == impl and r["mode"] == mode)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("ms")
        ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- (e) Mosaic GPU kernels

#: Goals for the Mosaic GPU kernels (bf16 fwd+bwd): <= 0.7x fla's chunk_gla at T >= 4K, <= 0.5x cuDNN at T = 8K.
MOSAIC_GOALS = (("fla_chunk_gla", 4096, 0.7), ("cudnn_attention", 8192, 0.5))


def _mosaic_gpu_ready(on_gpu, interpret):
    """None when ``gla_jax.kernels.mosaic_gpu`` can run here (interpret mode, or a GPU of compute capability >= 9.0),
    else the reason."""
    import jax

    if interpret:
        from gla_jax.kernels.mosaic_gpu.compat import interpret_class

        return None if interpret_class() is not None else "this jax has no Mosaic GPU interpret mode"
    if not on_gpu:
        return "no GPU"
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        ok = float(cc) >= 9.0
    except (TypeError, ValueError):
        ok = False
    return None if ok else f"needs compute capability >= 9.0 (Hopper), this GPU has {cc}"


def mosaic_goals(rows, interpret):
    """Mosaic GPU fwd+bwd vs fla at every measured T >= 4K and vs cuDNN at T = 8K (``MOSAIC_GOALS``)."""
    ms = timings_by_key(rows)
    return [speed_target(ms, "mosaic_gpu", other, T, limit, interpret)
            for other, T_min, limit in MOSAIC_GOALS
            for T in sorted({t for (i, t, _) in ms if i in (other, "mosaic_gpu")
                             and (t >= T_min if other == "fla_chunk_gla" else t == T_min)})]


def check_mosaic_gpu(*, B, T, H, K, V, Ts, D, interpret, on_gpu, iters, deadline, other_rows=()):
    """Mosaic GPU ``chunk_gla`` (impl "mosaic_gpu"): bf16 output and all gradients vs ``impl="chunk"`` (float32
    from the same rounded inputs), then fwd and fwd+bwd timings at B x H heads of width D for every T in ``Ts``
    (until ``deadline``), compared with the rows (b) measured. Returns the report's "mosaic_gpu" entry."""
    import jax
    import jax.numpy as jnp

    out = {"correctness": [], "timings": [], "skipped": [], "targets": []}
    reason = _mosaic_gpu_ready(on_gpu, interpret)
    if reason is not None:
        out["skipped"].append({"impl": "mosaic_gpu", "reason": reason})
        return out
    from gla_jax.kernels.mosaic_gpu import chunk_gla as mosaic_chunk_gla

    dtype = jnp.bfloat16
    out["correctness"].append(correctness_entry(functools.partial(mosaic_chunk_gla, interpret=interpret), B=B, T=T,
                                                H=H, K=K, V=V, dtype=dtype, seed=4, tol=TOL["bfloat16"]))

    f = lambda q, k, v, g: mosaic_chunk_gla(q, k, v, g, interpret=interpret)[0]
    fwd, fwdbwd = jax.jit(f), jax.jit(_fwdbwd(f))
    for T_ in sorted(Ts, reverse=True):
        q, k, v, g, rng = _inputs(B if not interpret else 1, T_, H, D, D, dtype, seed=2)
        do = jnp.asarray(rng.standard_normal((q.shape[0], T_, H, D)), dtype)
        time_modes("mosaic_gpu", T_, fwd, fwdbwd, (q, k, v, g), do, out["timings"], out["skipped"], iters=iters,
                   warmup=1, deadline=deadline)
    out["targets"] = mosaic_goals(list(other_rows) + out["timings"], interpret)
    return out


def main(argv=None):
    p = check_parser(__doc__.split("\n\n")[0], "gpu_check", "Pallas interpret mode at tiny sizes (CPU)")
    p.add_argument("--tune-budget-s", type=float, default=40.0,
                   help="(d) tiling comparison: seconds it may add after (b); 0 skips it")
    p.add_argument("--mosaic-budget-s", type=float, default=120.0,
                   help="(e) Mosaic GPU kernels (Hopper): seconds their timing may add; 0 skips the section")
    args = p.parse_args(argv)
    for name in ("budget_s", "tune_budget_s", "mosaic_budget_s"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}: expected seconds >= 0, got {getattr(args, name)}")

    start = time.perf_counter()
    _ensure_importable()
    import jax

    os.makedirs(args.out, exist_ok=True)
    backend = jax.default_backend()
    on_gpu = backend == "gpu"
    interpret = args.interpret or not on_gpu
    B, H, D, Ts, chk, iters = check_sizes(args, interpret, dict(B=1, T=100, H=2, K=32, V=32))
    dev = jax.devices()[0]
    report = {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": backend,
        "interpret": interpret,
        "versions": versions(),
        "config": {"B": B, "H": H, "D": D, "T": Ts, "dtype": "bfloat16", "iters": iters},
        "correctness": [],
        "timings": [],
        "skipped": [],
        "targets": [],
        "tuning": [],
        "mosaic_gpu": {},
    }
    out_json = os.path.join(args.out, "gpu_check.json")

    save = report_saver(report, out_json, start)

    print(f"device: {report['device']} ({backend}); interpret={interpret}", flush=True)
    if not args.skip_check:
        print("(a) correctness vs impl='chunk'", flush=True)
        report["correctness"] = check_correctness(**chk, interpret=interpret)
        print_correctness(report["correctness"])
        save()
    if not args.skip_bench:
        print(f"(b) timing B={B} H={H} D={D}" + (" (interpret mode: not a speed path)" if interpret else ""),
              flush=True)
        rows, skipped = benchmark(B=B, H=H, D=D, Ts=Ts, dtype_name="bfloat16", interpret=interpret, on_gpu=on_gpu,
                                  iters=iters, warmup=1, deadline=start + args.budget_s)
        report["timings"], report["skipped"] = rows, skipped
        report["targets"] = evaluate_targets(rows, interpret)
        print(table(rows))
        print_targets(report["targets"])
        png = plot(rows, os.path.join(args.out, "gpu_check.png"),
                   f"GLA B={B} H={H} D={D} bf16 on {report['device']}" + (" (interpret)" if interpret else ""))
        report["plot"] = os.path.basename(png) if png else None
        save()
    if args.tune_budget_s > 0:
        T_tune = max(Ts) if interpret else min(max(Ts), TARGET_T)
        print(f"(d) Pallas fwd+bwd by tiling at B={B} H={H} D={D} T={T_tune}", flush=True)
        tilings = TILINGS[:2] if interpret else TILINGS  # interpret mode: only show that the path runs
        report["tuning"], tune_skipped = tune(B=B, H=H, D=D, T=T_tune, dtype_name="bfloat16", interpret=interpret,
                                              iters=iters, deadline=time.perf_counter() + args.tune_budget_s,
                                              tilings=tilings)
        report["skipped"] += tune_skipped
    if args.mosaic_budget_s > 0:
        print("(e) Mosaic GPU kernels (impl mosaic_gpu): correctness vs impl='chunk' (bf16), timing", flush=True)
        mchk = dict(B=1, T=70, H=1, K=32, V=32) if interpret else chk
        mTs = [min(Ts)] if interpret else Ts
        report["mosaic_gpu"] = check_mosaic_gpu(**mchk, Ts=mTs, D=D, interpret=interpret, on_gpu=on_gpu, iters=iters,
                                                deadline=time.perf_counter() + args.mosaic_budget_s,
                                                other_rows=report["timings"])
        print_correctness(report["mosaic_gpu"]["correctness"], prefix="mosaic_gpu ")
        print_targets(report["mosaic_gpu"]["targets"])
        for sk in report["mosaic_gpu"]["skipped"]:
            print(f"  skipped mosaic_gpu: {sk}", flush=True)
    save()
    ok = all(e["ok"] for e in report["correctness"] + report["mosaic_gpu"].get("correctness", []))
    print(f"wrote {out_json}; correctness {'OK' if ok else 'FAILED'}; {report['elapsed_s']} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
