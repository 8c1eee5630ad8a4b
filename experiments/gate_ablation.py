"""Experiment 2: gate ablation (the GLA paper's Table 4 in miniature) on the embedded corpus.

Variants, all with the same width, depth, data, steps, batch and learning rate:

  * ``gla``    per-key data-dependent gate (the paper's GLA), 4 heads
  * ``scalar`` one data-dependent gate per head
  * ``fixed``  a constant per-head decay (RetNet-style)
  * ``none``   no decay (plain linear attention)
  * ``gla`` with 1 and 8 heads

Reported: final training perplexity (mean loss over the last 10% of steps) and held-out perplexity (held-out
documents of the corpus, packed rows of the training length). Training is the library's own loop
(``gla_jax.train.trainer.Trainer``, as ``gla-jax train``), one run per variant. The paper (340M parameters, 7B tokens, training ppl):
GLA 14.77 < scalar 15.56 < fixed 16.55 < none 23.21; 1 head 14.61, 8 heads 15.29.

    python experiments/gate_ablation.py            # CPU default (a few minutes)
    python experiments/gate_ablation.py --smoke    # seconds
    python experiments/gate_ablation.py --width 1024 --layers 24 --seq-len 2048 --batch 256 --steps 14000 \\
        --source 'data/*.npy' --vocab 32000          # the paper's scale: a GPU job
"""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

VARIANTS = {  # name: (gate, heads)
    "gla": ("gla", 4),
    "scalar": ("scalar", 4),
    "fixed": ("fixed", 4),
    "none": ("none", 4),
    "gla-1head": ("gla", 1),
    "gla-8heads": ("gla", 8),
}
PAPER_TRAIN_PPL = {"gla": 14.77, "scalar": 15.56, "fixed": 16.55, "none": 23.21, "gla-1head": 14.61,
                   "gla-8heads": 15.29}


def overrides(name: str, args) -> dict:
    """Dotted config overrides of the library's training config (``gla-jax train key=value``) for a variant."""
    gate, heads = VARIANTS[name]
    return {
        "model.arch": "gla", "model.hidden_size": args.width, "model.num_hidden_layers": args.layers,
        "model.num_heads": heads, "model.gate": gate, "model.vocab_size": args.vocab,
        "model.tie_word_embeddings": True,
        **C.run_overrides(args, seq_len=args.seq_len, eval_batches=args.eval_batches),
    }


def run(args) -> dict:
    import tempfile

    started = C.utc_now()
    rows, curves = [], {}
    for name in args.variants:
        workdir = (args.workdir / name) if args.workdir else pathlib.Path(tempfile.mkdtemp(prefix=f"gate_{name}_"))
        t = C.timer()
        summary, trainer, _ = C.library_train(workdir, overrides(name, args))
        secs = t()
        losses = summary["losses"]
        train_loss = C.final_train_loss(losses)
        val_loss = float(summary["eval_loss"])
        rows.append({"variant": name, "gate": VARIANTS[name][0], "heads": VARIANTS[name][1],
                     "params": int(summary["n_params"]), "train_loss": train_loss, "train_ppl": math.exp(train_loss),
                     "val_loss": val_loss, "val_ppl": math.exp(val_loss), "train_seconds": secs,
                     "tokens": args.steps * args.batch * args.seq_len, "paper_train_ppl": PAPER_TRAIN_PPL[name]})
        every = max(1, len(losses) // 100)
        curves[name] = [{"step": s, "loss": losses[s]} for s in sorted(losses) if s % every == 0 or s == args.steps]
        print(f"  {name:11s} train ppl {math.exp(train_loss):7.3f}  held-out ppl {math.exp(val_loss):7.3f}  "
              f"({secs:.0f}s)", flush=True)
    order = [r["variant"] for r in sorted((r for r in rows if r["heads"] == 4), key=lambda r: r["val_loss"])]
    config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    config["trainer"] = "gla_jax.train.trainer.Trainer (the gla-jax train loop)"
    path = C.write_results(args.name, config=config, seed=args.seed, results=rows, out_dir=args.out,
                           started=started, extra={"curves": curves, "held_out_order_4_heads": order,
                                                   "paper_order": ["gla", "scalar", "fixed", "none"]}, replace=True)
    print(C.format_table(rows, ["variant", "heads", "params", "train_ppl", "val_ppl", "paper_train_ppl",
                                "train_seconds"]))
    print("held-out order (4 heads, best first):", " < ".join(order), "   paper: gla < scalar < fixed < none")
    if not args.no_plot:
        plot(rows, curves, args.out, args.name)
    return {"json": path, "rows": rows}


def plot(rows, curves, out_dir, name):
    plt = C.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for v, hist in curves.items():
        a1.plot([h["step"] for h in hist], [math.exp(min(h["loss"], 20)) for h in hist], label=v)
    a1.set_yscale("log")
    a1.set_xlabel("step")
    a1.set_ylabel("training perplexity")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    names = [r["variant"] for r in rows]
    x = np.arange(len(rows))
    a2.bar(x - 0.2, [r["train_ppl"] for r in rows], 0.4, label="train (last 10%)")
    a2.bar(x + 0.2, [r["val_ppl"] for r in rows], 0.4, label="held-out")
    a2.set_xticks(x, names, rotation=20)
    a2.set_ylabel("perplexity (byte level)")
    lo = min(min(r["train_ppl"], r["val_ppl"]) for r in rows)
    a2.set_ylim(lo * 0.9, None)
    a2.grid(alpha=0.3, axis="y")
    a2.legend(fontsize=8)
    return C.save_figure(fig, out_dir, name)


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: all")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    C.add_run_flags(p, batch=16, steps=200)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--workdir", type=pathlib.Path, default=None,
                   help="keep each variant's run (metrics.jsonl, config) in WORKDIR/<variant> (default: temporary)")
    p.add_argument("--name", default="gate_ablation", help="results file stem")
    args = p.parse_args(argv)
    if args.smoke:
        args.width, args.layers, args.seq_len, args.batch, args.steps, args.eval_batches = 32, 1, 64, 2, 3, 1
        args.variants = args.variants or ["gla", "none", "gla-8heads"]
        args.name = args.name if args.name != "gate_ablation" else "gate_ablation_smoke"
    args.variants = args.variants or list(VARIANTS)
    return args


def main(argv=None):
    args = parse_args(argv)
    C.refuse_overwrite(args.out, args.name, args.replace or args.smoke)
    print(f"gate ablation: {args.variants}; width {args.width} x {args.layers} layers, {args.steps} steps of "
          f"{args.batch} x {args.seq_len} tokens")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
