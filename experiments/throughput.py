"""Experiment 4: training throughput and memory of GLA vs Transformer++ against sequence length.

Both models share width, depth, MLP and vocabulary, so their parameter counts match to within the GLA layer's
low-rank gate (the counts are printed and recorded). Each step is the library's training step (``gla_jax.train.step``
with ``gla_jax.train.optim``'s AdamW: forward, backward, clipping, update, as ``gla-jax train`` runs it) on random
tokens with a fixed number of tokens per batch (batch = tokens // seq_len), so a flat tokens/s curve means cost
linear in length. Reported per (model, length): tokens/s (median of the timed steps after one
compile + warm-up step), compile seconds, and memory: XLA's buffer estimate of the compiled step (arguments +
outputs + temporaries − donated) and, on GPU, the device's peak bytes in use.

Operator-level figures (the kernel alone, fwd+bwd, vs attention) come from ``experiments/bench_ops.py``.

    python experiments/throughput.py                     # CPU: a 2-layer width-256 model, lengths 256..4096
    python experiments/throughput.py --smoke             # seconds
    python experiments/throughput.py --device gpu --preset 340m --lengths 2048 4096 8192 16384 --tokens 32768
    python experiments/throughput.py --device gpu --preset 1.3b --dtype bfloat16 --remat
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

MODELS = ("gla", "transformer")
LABELS = {"gla": "GLA", "transformer": "Transformer++"}


def build(kind: str, args, seq_len: int):
    """The model for ``kind`` at the size given by ``args`` (a preset on GPU, else explicit width/depth)."""
    from flax import nnx

    from gla_jax.models import GLAConfig, TransformerConfig, build_model

    if args.preset:
        from gla_jax.models.config import get_config

        name = f"{'gla' if kind == 'gla' else 'transformer'}-{args.preset}"
        extra = {"dtype": args.dtype, "remat": args.remat}
        if kind == "transformer":
            extra["max_position_embeddings"] = max(seq_len, 2048)
        cfg = get_config(name, **extra)
    elif kind == "gla":
        cfg = GLAConfig(hidden_size=args.width, num_hidden_layers=args.layers, num_heads=args.heads,
                        vocab_size=args.vocab, tie_word_embeddings=True, dtype=args.dtype, remat=args.remat)
    else:
        cfg = TransformerConfig(hidden_size=args.width, num_hidden_layers=args.layers,
                                num_heads=args.width // args.attn_head_dim, vocab_size=args.vocab,
                                tie_word_embeddings=True, max_position_embeddings=max(seq_len, 2048),
                                dtype=args.dtype, remat=args.remat)
    return build_model(cfg, rngs=nnx.Rngs(args.seed)), cfg


def measure(kind: str, seq_len: int, args) -> dict:
    """One (model, length) point: the library's train step (``gla_jax.train.step`` with ``gla_jax.train.optim``'s
    AdamW) compiled once, then timed."""
    import jax
    import jax.numpy as jnp

    from gla_jax.train import optim, step
    from gla_jax.train.config import OptimSection

    batch = max(1, args.tokens // seq_len)
    model, cfg = build(kind, args, seq_len)
    apply, params = step.split_model(model)
    del model
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx = optim.make_optimizer(OptimSection(lr=1e-4, warmup_steps=10), 1000)
    train_step = jax.jit(step.make_train_step(apply, tx), donate_argnums=(0, 1))
    rng = np.random.default_rng(args.seed)
    data = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, size=(batch, seq_len)), jnp.int32)}
    opt_state = tx.init(params)
    t = C.timer()
    compiled = train_step.lower(params, opt_state, data).compile()
    mem = C.memory_estimate(compiled)
    params, opt_state, metrics = compiled(params, opt_state, data)  # compile is done; this is the warm-up step
    jax.block_until_ready(metrics)
    compile_s = t()
    times = []
    for _ in range(args.steps):
        t = C.timer()
        params, opt_state, metrics = compiled(params, opt_state, data)
        jax.block_until_ready(metrics)
        times.append(t())
    sec = statistics.median(times)
    row = {"model": kind, "seq_len": seq_len, "batch": batch, "tokens_per_step": batch * seq_len, "params": n_params,
           "step_seconds": sec, "tokens_per_sec": batch * seq_len / sec, "compile_seconds": compile_s,
           "loss": float(metrics["loss"]), **mem, "device_peak_bytes": _device_peak()}
    del params, opt_state
    return row


def _device_peak():
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def run(args) -> dict:
    started = C.utc_now()
    rows = []
    for seq_len in args.lengths:
        for kind in args.models:
            row = measure(kind, seq_len, args)
            rows.append(row)
            mib = (row["peak_estimate_bytes"] or 0) / 2 ** 20
            print(f"  {LABELS[kind]:14s} T {seq_len:6d}  batch {row['batch']:3d}  {row['tokens_per_sec']:10.0f} tok/s"
                  f"  step {row['step_seconds'] * 1e3:8.1f} ms  mem est {mib:8.1f} MiB  params {row['params']}",
                  flush=True)
    config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    path = C.write_results(args.name, config=config, seed=args.seed, results=rows, out_dir=args.out, started=started,
                           replace=True)
    print(C.format_table(rows, ["model", "seq_len", "batch", "params", "tokens_per_sec", "step_seconds",
                                "compile_seconds", "peak_estimate_bytes", "device_peak_bytes"]))
    if not args.no_plot:
        plot(rows, args.out, args.name)
    return {"json": path, "rows": rows}


def plot(rows, out_dir, name):
    plt = C.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in MODELS:
        pts = sorted((r["seq_len"], r["tokens_per_sec"], r["peak_estimate_bytes"]) for r in rows if r["model"] == kind)
        if not pts:
            continue
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[kind])
        if all(p[2] for p in pts):
            a2.plot([p[0] for p in pts], [p[2] / 2 ** 20 for p in pts], marker="o", label=LABELS[kind])
    for ax, ylabel in ((a1, "training tokens / s"), (a2, "memory estimate of the step (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens per batch fixed)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    a2.set_yscale("log")
    return C.save_figure(fig, out_dir, name)


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: default to the 340m preset, bfloat16, lengths 2K-16K, 32K tokens per step")
    p.add_argument("--preset", choices=["340m", "1.3b"], default=None, help="the paper's model sizes")
    p.add_argument("--lengths", nargs="+", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens per training step")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4, help="GLA heads")
    p.add_argument("--attn-head-dim", type=int, default=64, help="Transformer++ head width")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point (median)")
    p.add_argument("--name", default="throughput", help="results file stem")
    args = p.parse_args(argv)
    if args.device == "gpu":
        args.preset = args.preset or "340m"
        args.lengths = args.lengths or [2048, 4096, 8192, 16384]
        args.tokens = args.tokens or 32768
        args.dtype = args.dtype or "bfloat16"
        args.steps = max(args.steps, 10)
    if args.smoke:
        args.lengths, args.tokens, args.width, args.layers, args.heads, args.steps = [64, 128], 256, 32, 1, 2, 1
        args.attn_head_dim = 16
        args.name = args.name if args.name != "throughput" else "throughput_smoke"
    args.lengths = args.lengths or [256, 512, 1024, 2048, 4096]
    args.tokens = args.tokens or 4096
    args.dtype = args.dtype or "float32"
    if args.device == "gpu":
        import jax

        if jax.default_backend() != "gpu":
            raise SystemExit("--device gpu: JAX sees no GPU (backend is " + jax.default_backend() + ")")
    return args


def main(argv=None):
    args = parse_args(argv)
    C.refuse_overwrite(args.out, args.name, args.replace or args.smoke)
    print(f"throughput: {args.models} lengths {args.lengths}, {args.tokens} tokens/step, dtype {args.dtype}, "
          f"{'preset ' + args.preset if args.preset else f'width {args.width} x {args.layers} layers'}")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
