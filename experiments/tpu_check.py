"""Does the Mosaic TPU GLA kernel work on this TPU, and how fast is it?

    python experiments/tpu_check.py --out experiments/results/tpu/<run>      # on one TPU (v5e/v5p/v6e), minutes
    python experiments/tpu_check.py --interpret --out /tmp/tpu_check          # CPU, tiny sizes (CI)

(a) compiles ``gla_jax.kernels.mosaic_tpu.chunk_gla`` and checks forward and gradients (q, k, v, g, initial_state,
    with packed documents) against ``gla(impl="chunk")`` in float32 and bfloat16;
(b) times forward and forward+backward of the kernel, ``impl="chunk"`` under XLA, causal
    ``jax.nn.dot_product_attention`` (XLA) and, on a TPU, the Pallas splash attention kernel, at B=4, H=16, D=128
    for T in 2K/4K/8K/16K;
(c) prints a table and writes ``tpu_check.json`` and ``tpu_check.png`` (when matplotlib imports) into --out with the
    device, package versions, the kernels' VMEM estimates for the device's generation, and the ratios at T >= 8K
    (targets: fwd+bwd <= 1.0x XLA chunk and <= 1.0x splash attention).

Needs jax and numpy only. Interpret mode is not a speed path: its timings only show that the code runs.
"""

from __future__ import annotations

import functools
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import gpu_check as common  # noqa: E402  (shared helpers: versions, inputs, timing, table, plot)

TARGET_T = 8192
TARGETS = {"chunk_xla": 1.0, "splash_attention": 1.0}
TOL = {"float32": 1e-4, "bfloat16": 4e-3}  # as tests/test_mosaic_tpu.py


def generation_of(device_kind: str) -> str:
    """TPU generation name used by ``tiling.SCOPED_VMEM_BYTES`` from a jax device_kind ("TPU v5 lite" -> v5e)."""
    kind = device_kind.lower()
    if "v6" in kind:
        return "v6e"
    if "v5" in kind:
        return "v5e" if ("lite" in kind or "v5e" in kind) else "v5p"
    if "v4" in kind:
        return "v4"
    return "v5e"  # not a TPU (interpret mode): the smallest scoped limit


def check_correctness(*, B, T, H, K, V, interpret, generation):
    """Mosaic TPU kernels vs impl="chunk" (float32 reference from the same rounded inputs), forward and all
    gradients, in float32 and bfloat16."""
    import jax.numpy as jnp

    from gla_jax.kernels.mosaic_tpu import chunk_gla

    kernel = functools.partial(chunk_gla, interpret=interpret, generation=generation)
    return [common.correctness_entry(kernel, B=B, T=T, H=H, K=K, V=V, dtype=dtype, seed=1,
                                     tol=TOL[jnp.dtype(dtype).name])
            for dtype in (jnp.float32, jnp.bfloat16)]


def _impls(interpret, on_tpu, generation, B, H, T):
    import jax

    from gla_jax.kernels.mosaic_tpu import chunk_gla
    from gla_jax.ops import gla

    impls = {
        "mosaic_tpu": lambda q, k, v, g: chunk_gla(q, k, v, g, interpret=interpret, generation=generation)[0],
        "chunk_xla": lambda q, k, v, g: gla(q, k, v, g, impl="chunk")[0],
        "xla_attention": lambda q, k, v, g: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                         implementation="xla"),
    }
    if on_tpu:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

        mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(H)])
        splash = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
        # [B, T, H, D] -> per batch [H, T, D]; splash takes pre-scaled queries
        impls["splash_attention"] = lambda q, k, v, g: jax.vmap(splash)(
            *(x.transpose(0, 2, 1, 3) for x in (q * q.shape[-1] ** -0.5, k, v))).transpose(0, 2, 1, 3)
    out = {}
    for name, f in impls.items():
        if name in ("xla_attention", "splash_attention"):  # no gate: differentiate q, k, v only
            def fwdbwd(q, k, v, g, do, f=f):
                o, vjp = jax.vjp(lambda q, k, v: f(q, k, v, g), q, k, v)
                return vjp(do.astype(o.dtype))
        else:
            fwdbwd = common._fwdbwd(f)
        out[name] = (jax.jit(f), jax.jit(fwdbwd))
    return out


def benchmark(*, B, H, D, Ts, interpret, on_tpu, generation, iters, warmup, deadline):
    import jax.numpy as jnp

    rows, skipped = [], []
    if not on_tpu:
        skipped.append({"impl": "splash_attention", "reason": "no TPU (splash attention is a Mosaic TPU kernel)"})
    for T in sorted(Ts, reverse=True):  # longest first: the targets are at T >= 8K if the budget runs out
        q, k, v, g, rng = common._inputs(B, T, H, D, D, jnp.bfloat16, seed=2)
        do = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.bfloat16)
        for name, (fwd, fwdbwd) in _impls(interpret, on_tpu, generation, B, H, T).items():
            common.time_modes(name, T, fwd, fwdbwd, (q, k, v, g), do, rows, skipped, iters=iters, warmup=warmup,
                              deadline=deadline)
    return rows, skipped


def evaluate_targets(rows, interpret):
    """mosaic_tpu fwd+bwd vs each baseline of TARGETS at every measured T >= 8K."""
    ms = common.timings_by_key(rows)
    out = [common.speed_target(ms, "mosaic_tpu", other, T, limit, interpret)
           for T in sorted({r["T"] for r in rows if r["T"] >= TARGET_T}) for other, limit in TARGETS.items()]
    if not out:
        out.append({"target": f"mosaic_tpu fwd+bwd vs {', '.join(TARGETS)} at T >= {TARGET_T}", "met": None,
                    "note": f"no T >= {TARGET_T} measured"})
    return out


def main(argv=None):
    p = common.check_parser(__doc__.split("\n\n")[0], "tpu_check", "TPU interpret mode at tiny sizes (CPU)")
    args = p.parse_args(argv)
    if args.budget_s < 0:
        p.error(f"--budget-s: expected seconds >= 0, got {args.budget_s}")

    start = time.perf_counter()
    common._ensure_importable()
    import jax
    import jax.numpy as jnp

    from gla_jax.kernels.mosaic_tpu import Tiling, vmem_bytes
    from gla_jax.kernels.mosaic_tpu.tiling import SCOPED_VMEM_BYTES, padded_width

    os.makedirs(args.out, exist_ok=True)
    backend = jax.default_backend()
    on_tpu = backend == "tpu"
    interpret = args.interpret or not on_tpu
    B, H, D, Ts, chk, iters = common.check_sizes(args, interpret, dict(B=1, T=140, H=1, K=32, V=32))
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    generation = generation_of(kind) if on_tpu else "v5e"
    tiling = Tiling(generation=generation)
    vmem = {f"K{K}_V{V}_{dt}": {kern: vmem_bytes(kern, tiling, padded_width(K), padded_width(V), jnp.dtype(dt))
                                for kern in ("forward", "states", "backward")}
            for K, V in ((D, D), (128, 256), (256, 512)) for dt in ("bfloat16", "float32")}
    report = {
        "device": kind, "backend": backend, "generation": generation, "interpret": interpret,
        "versions": common.versions(),
        "config": {"B": B, "H": H, "D": D, "T": Ts, "dtype": "bfloat16", "iters": iters,
                   "chunk_size": tiling.chunk_size, "sub_chunk": tiling.sub_chunk},
        "vmem_estimate_bytes": vmem, "scoped_vmem_limit_bytes": SCOPED_VMEM_BYTES[generation],
        "correctness": [], "timings": [], "skipped": [], "targets": [],
    }
    out_json = os.path.join(args.out, "tpu_check.json")

    save = common.report_saver(report, out_json, start)

    print(f"device: {kind} ({backend}, {generation}); interpret={interpret}", flush=True)
    if not args.skip_check:
        print("(a) correctness vs impl='chunk'", flush=True)
        report["correctness"] = check_correctness(**chk, interpret=interpret, generation=generation)
        common.print_correctness(report["correctness"])
        save()
    if not args.skip_bench:
        print(f"(b) timing B={B} H={H} D={D}" + (" (interpret mode: not a speed path)" if interpret else ""),
              flush=True)
        rows, skipped = benchmark(B=B, H=H, D=D, Ts=Ts, interpret=interpret, on_tpu=on_tpu, generation=generation,
                                  iters=iters, warmup=1, deadline=start + args.budget_s)
        report["timings"], report["skipped"] = rows, skipped
        report["targets"] = evaluate_targets(rows, interpret)
        print(common.table(rows))
        common.print_targets(report["targets"])
        png = common.plot(rows, os.path.join(args.out, "tpu_check.png"),
                          f"GLA B={B} H={H} D={D} bf16 on {kind}" + (" (interpret)" if interpret else ""))
        report["plot"] = os.path.basename(png) if png else None
    save()
    ok = all(e["ok"] for e in report["correctness"])
    print(f"wrote {out_json}; correctness {'OK' if ok else 'FAILED'}; {report['elapsed_s']} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
