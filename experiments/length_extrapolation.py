"""Experiment 3: length extrapolation. Train GLA and Transformer++ at a short length, evaluate perplexity per
position bucket far past it.

Both models (same width, depth and MLP; Transformer++ with rotary embeddings, no extrapolation tricks) are trained
on packed rows of ``--train-len`` tokens of the embedded corpus, then evaluated on windows of
``--factor x train-len`` tokens cut from held-out documents (each window a fresh context, so position p means "p
tokens of context"). The loss at each position is averaged over windows and reported per bucket of positions. The
paper (trained at 2K): GLA's perplexity stays flat to ~18-20K tokens; Transformer++'s rises past the training length.

    python experiments/length_extrapolation.py             # CPU default: train at 256, evaluate to 16x (4096)
    python experiments/length_extrapolation.py --smoke     # seconds
    python experiments/length_extrapolation.py --width 1024 --layers 24 --train-len 2048 --factor 10 ...  # GPU
"""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

MODELS = ("gla", "transformer")
LABELS = {"gla": "GLA", "transformer": "Transformer++"}


def build(kind: str, args):
    from flax import nnx

    from gla_jax.models import GLAConfig, GLAForCausalLM

    if kind == "gla":
        cfg = GLAConfig(hidden_size=args.width, num_hidden_layers=args.layers, num_heads=args.heads,
                        vocab_size=args.vocab, tie_word_embeddings=True, dtype=args.dtype)
        return GLAForCausalLM(cfg, rngs=nnx.Rngs(args.seed))
    from gla_jax.models import TransformerConfig, TransformerForCausalLM

    cfg = TransformerConfig(hidden_size=args.width, num_hidden_layers=args.layers,
                            num_heads=max(1, args.width // args.attn_head_dim), vocab_size=args.vocab,
                            tie_word_embeddings=True, max_position_embeddings=args.train_len, dtype=args.dtype)
    return TransformerForCausalLM(cfg, rngs=nnx.Rngs(args.seed))


def buckets(eval_len: int, train_len: int) -> list[tuple[int, int]]:
    """Position buckets [lo, hi): the training length split in two, then doubling ranges up to ``eval_len``."""
    if eval_len < 2 or train_len < 2:
        raise ValueError(f"eval_len/train_len: expected >= 2, got {eval_len}, {train_len}")
    edges = [0, train_len // 2, train_len]
    while edges[-1] < eval_len:
        edges.append(min(edges[-1] * 2, eval_len))
    edges = sorted({e for e in edges if e <= eval_len})
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def bucket_losses(per_pos: np.ndarray, bks) -> list[float]:
    return [float(per_pos[a:b].mean()) for a, b in bks]


def run(args) -> dict:
    started = C.utc_now()
    train_src, val_src, tok = C.lm_sources(args.source, val_fraction=args.val_fraction, tokenizer=args.tokenizer)
    eval_len = args.train_len * args.factor
    xs, ys = C.eval_windows(val_src, eval_len, args.eval_windows)
    bks = buckets(eval_len, args.train_len)
    rows, per_position = [], {}
    for kind in args.models:
        model = build(kind, args)
        batches = C.lm_batches(train_src, seq_len=args.train_len, batch_size=args.batch, seed=args.seed)
        hist, secs = C.train_model(model, batches, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                                   log_every=args.log_every)
        per_pos, mean = C.lm_eval_loss(model, xs, ys, batch_size=args.eval_batch)
        per_position[kind] = per_pos
        for (a, b), loss in zip(bks, bucket_losses(per_pos, bks)):
            rows.append({"model": kind, "bucket_start": a, "bucket_end": b, "loss": loss, "ppl": math.exp(loss),
                         "beyond_train_len": a >= args.train_len})
        inside = float(per_pos[: args.train_len].mean())
        beyond = float(per_pos[args.train_len:].mean()) if eval_len > args.train_len else inside
        print(f"  {LABELS[kind]:14s} params {C.count_params(model)}  final train loss {hist[-1]['loss']:.3f}  "
              f"ppl <= train len {math.exp(inside):.3f}, beyond {math.exp(beyond):.3f}  ({secs:.0f}s)", flush=True)
        rows.append({"model": kind, "bucket_start": 0, "bucket_end": eval_len, "loss": mean, "ppl": math.exp(mean),
                     "beyond_train_len": None, "summary": True, "params": C.count_params(model),
                     "final_train_loss": hist[-1]["loss"], "train_seconds": secs,
                     "ppl_within_train_len": math.exp(inside), "ppl_beyond_train_len": math.exp(beyond)})
    config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    config.update(eval_len=eval_len, eval_windows_used=int(len(xs)))
    path = C.write_results(args.name, config=config, seed=args.seed, results=rows, out_dir=args.out,
                           started=started, extra={"buckets": bks})
    table = {}
    for r in rows:
        if r.get("summary"):
            continue
        table.setdefault((r["bucket_start"], r["bucket_end"]), {})[r["model"]] = r["ppl"]
    print(C.format_table([{"positions": f"{a}-{b}", **{LABELS[m]: v for m, v in d.items()}}
                          for (a, b), d in table.items()]))
    if not args.no_plot:
        plot(per_position, bks, args, args.out, args.name)
    return {"json": path, "rows": rows}


def plot(per_position, bks, args, out_dir, name):
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, per_pos in per_position.items():
        centers = [(a + b) / 2 for a, b in bks]
        ax.plot(centers, [math.exp(x) for x in bucket_losses(per_pos, bks)], marker="o", label=LABELS[kind])
    ax.axvline(args.train_len, color="gray", ls="--", label=f"training length {args.train_len}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("position in context (bucket centre)")
    ax.set_ylabel("held-out perplexity (byte level)")
    ax.grid(alpha=0.3)
    ax.legend()
    return C.save_figure(fig, out_dir, name)


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--factor", type=int, default=16, help="evaluate to factor x train-len")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4, help="GLA heads")
    p.add_argument("--attn-head-dim", type=int, default=32, help="Transformer++ head width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--source", default="stdlib")
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--vocab", type=int, default=C.BYTE_VOCAB)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--name", default="length_extrapolation", help="results file stem")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_len, args.factor, args.width, args.layers, args.batch, args.steps = 32, 4, 32, 1, 2, 3
        args.eval_windows, args.attn_head_dim = 2, 16
        args.name = args.name if args.name != "length_extrapolation" else "length_extrapolation_smoke"
    if args.factor < 1:
        raise ValueError(f"--factor: expected >= 1, got {args.factor}")
    return args


def main(argv=None):
    args = parse_args(argv)
    print(f"length extrapolation: {args.models} trained at {args.train_len}, evaluated to "
          f"{args.train_len * args.factor} ({args.steps} steps of {args.batch} rows)")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
