"""Experiment 3: length extrapolation. Train GLA and Transformer++ at a short length, evaluate perplexity per
position bucket far past it.

Both models (same width, depth and MLP; Transformer++ with rotary embeddings, no extrapolation tricks) are trained
with the library's loop (``gla-jax train``) on packed rows of ``--train-len`` tokens of the embedded corpus, then
evaluated as ``gla-jax eval`` does: held-out documents packed into rows of ``--factor x train-len`` tokens, each
position's loss credited to the bucket of its offset inside its document ([0, L), [L, 2L), [2L, 4L), ...), so the
buckets past L measure extrapolation. The
paper (trained at 2K): GLA's perplexity stays flat to ~18-20K tokens; Transformer++'s rises past the training length.

    python experiments/length_extrapolation.py             # CPU default: train at 256, evaluate to 16x (4096)
    python experiments/length_extrapolation.py --smoke     # seconds
    python experiments/length_extrapolation.py --width 1024 --layers 24 --train-len 2048 --factor 10 ...  # GPU
"""

from __future__ import annotations

import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

MODELS = ("gla", "transformer")
LABELS = {"gla": "GLA", "transformer": "Transformer++"}


def overrides(kind: str, args) -> dict:
    """Dotted config overrides of the library's training config for ``kind`` (same width, depth and MLP)."""
    heads = args.heads if kind == "gla" else max(1, args.width // args.attn_head_dim)
    ov = {
        "model.arch": kind, "model.hidden_size": args.width, "model.num_hidden_layers": args.layers,
        "model.num_heads": heads, "model.vocab_size": args.vocab, "model.tie_word_embeddings": True,
        **C.run_overrides(args, seq_len=args.train_len, checkpoint=True),
    }
    if kind == "transformer":
        ov["model.max_position_embeddings"] = args.train_len
    return ov


def run(args) -> dict:
    import tempfile

    started = C.utc_now()
    eval_len = args.train_len * args.factor
    rows, evals = [], {}
    for kind in args.models:
        workdir = (args.workdir / kind) if args.workdir else pathlib.Path(tempfile.mkdtemp(prefix=f"lenx_{kind}_"))
        t = C.timer()
        summary, _, _ = C.library_train(workdir, overrides(kind, args))
        secs = t()
        ev = C.library_eval(workdir, seq_len=eval_len, batches=args.eval_batches, batch_size=args.eval_batch,
                            overrides=[f"mesh.data={args.mesh_data}"])
        evals[kind] = ev
        for bk in ev["buckets"]:
            rows.append({"model": kind, "bucket_start": bk["start"], "bucket_end": bk["end"], "tokens": bk["tokens"],
                         "loss": bk["loss"], "ppl": bk["ppl"], "beyond_train_len": bk["start"] >= args.train_len})
        inside = [b for b in ev["buckets"] if b["end"] <= args.train_len]
        beyond = [b for b in ev["buckets"] if b["start"] >= args.train_len and b["loss"] is not None]
        ppl_in = ev["ppl"]
        ppl_far = beyond[-1]["ppl"] if beyond else None
        rows.append({"model": kind, "summary": True, "params": int(summary["n_params"]),
                     "final_train_loss": C.final_train_loss(summary["losses"]), "train_seconds": secs,
                     "ppl_within_train_len": ppl_in, "ppl_last_bucket": ppl_far,
                     "eval_tokens": ev["tokens"], "n_inside_buckets": len(inside)})
        print(f"  {LABELS[kind]:14s} params {int(summary['n_params'])}  ppl within {args.train_len}: {ppl_in:.3f}, "
              f"last bucket: {ppl_far if ppl_far is None else round(ppl_far, 3)}  ({secs:.0f}s)", flush=True)
    config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    config.update(eval_len=eval_len, trainer="gla_jax.train.trainer.Trainer + gla_jax.train.evaluate.evaluate_run "
                                             "(gla-jax train / gla-jax eval)")
    path = C.write_results(args.name, config=config, seed=args.seed, results=rows, out_dir=args.out,
                           started=started, extra={"evals": evals}, replace=True)
    table = {}
    for r in rows:
        if not r.get("summary"):
            table.setdefault((r["bucket_start"], r["bucket_end"]), {})[LABELS[r["model"]]] = r["ppl"]
    print(C.format_table([{"positions": f"{a}-{b}", **d} for (a, b), d in table.items()]))
    if not args.no_plot:
        plot(evals, args, args.out, args.name)
    return {"json": path, "rows": rows}


def plot(evals, args, out_dir, name):
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, ev in evals.items():
        pts = [((b["start"] + b["end"]) / 2, b["ppl"]) for b in ev["buckets"] if b["ppl"] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[kind])
    ax.axvline(args.train_len, color="gray", ls="--", label=f"training length {args.train_len}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("position in document (bucket centre)")
    ax.set_ylabel("held-out perplexity (byte level)")
    ax.grid(alpha=0.3)
    ax.legend()
    return C.save_figure(fig, out_dir, name)


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--train-len", type=int, default=256)
    p.add_argument("--factor", type=int, default=16, help="evaluate to factor x train-len")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4, help="GLA heads")
    p.add_argument("--attn-head-dim", type=int, default=16, help="Transformer++ head width")
    C.add_run_flags(p, batch=8, steps=200)
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches of the evaluation")
    p.add_argument("--eval-batch", type=int, default=4, help="rows (of factor x train-len tokens) per batch")
    p.add_argument("--workdir", type=pathlib.Path, default=None,
                   help="keep each model's run (metrics, checkpoint) in WORKDIR/<model> (default: temporary)")
    p.add_argument("--name", default="length_extrapolation", help="results file stem")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_len, args.factor, args.width, args.layers, args.batch, args.steps = 32, 4, 32, 1, 2, 3
        args.eval_batches, args.eval_batch, args.attn_head_dim = 1, 2, 16
        args.name = args.name if args.name != "length_extrapolation" else "length_extrapolation_smoke"
    if args.factor < 1:
        raise ValueError(f"--factor: expected >= 1, got {args.factor}")
    return args


def main(argv=None):
    args = parse_args(argv)
    C.refuse_overwrite(args.out, args.name, args.replace or args.smoke)
    print(f"length extrapolation: {args.models} trained at {args.train_len}, evaluated to "
          f"{args.train_len * args.factor} ({args.steps} steps of {args.batch} rows)")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
