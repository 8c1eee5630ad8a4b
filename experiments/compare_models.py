"""Experiment 4: the GLA paper's main comparison at CPU scale. GLA, Transformer++, RetNet, Mamba and Mamba2 at
matched parameter counts, same corpus, tokenizer and budget; held-out perplexity, perplexity by position past the
training length, and MQAR accuracy for every family; and the gate ablation's scalar-decay rows.

Shapes (``--width`` D, ``--layers`` L, ``--heads`` h; every model with tied embeddings):

  * ``gla``          L layers, h heads, fla's defaults (expand_k 0.5, expand_v 1, SwiGLU MLP): the reference count
  * ``transformer``  L layers, D/16 heads of width 16, rotary, SwiGLU MLP (Transformer++)
  * ``retnet``       L layers, h heads, fla's RetNet (expand_k 1, expand_v 2); its MLP width is chosen so its count
                     is closest to GLA's
  * ``mamba``        2L layers (no MLP: the papers' depth convention), expand 2, state 16
  * ``mamba2``       2L layers, h heads, expand 2; its state size (16/32/64/128) is chosen closest to GLA's count

Each family is trained with the library's loop (``gla-jax train``) on packed rows of ``--train-len`` tokens of the
embedded corpus (the data and byte tokenizer of gate_ablation.py / length_extrapolation.py), then evaluated as
``gla-jax eval`` does (held-out documents in rows of ``--factor x train-len``, loss per position bucket). The
trainer's own held-out loss at the training length is the ``val_ppl`` of the table. MQAR (experiments/mqar.py's
data, training and metric) trains the same five shapes at ``--mqar-width`` on a recall task.

Gate ablation: the paper's Table 4 rows GLA (per-key data-dependent gate), data-dependent scalar gate (Mamba2/SSD
form), fixed scalar decay (RetNet) and no gate come from the runs above (GLA, Mamba2, RetNet: the same runs as the
comparison, so the rows differ in architecture as well as gate) plus GLA with ``gate=none``: trained here with
``--nogate-run`` (or alone: ``--models gla-nogate``), otherwise GLA's own gate variants (scalar, fixed, none) are
taken from ``results/gate_ablation.json`` when it was run with the same width, depth, data, budget and optimizer (the
defaults of both scripts agree) and its GLA row equals this run's (the same code and data).

Results are written after every family (``<name>.json`` grows; a cut-off run keeps what finished).

    python experiments/compare_models.py                # CPU default (about 50 minutes on 2 loaded cores)
    python experiments/compare_models.py --smoke        # seconds
    python experiments/compare_models.py --width 1024 --layers 24 --train-len 2048 --batch 256 --steps 14000 \\
        --source 'data/*.npy' --vocab 32000             # the paper's 340M scale: a GPU job
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402
import mqar  # noqa: E402

FAMILIES = ("gla", "transformer", "retnet", "mamba2", "mamba")  # the slowest last
LABELS = {"gla": "GLA", "transformer": "Transformer++", "retnet": "RetNet", "mamba": "Mamba", "mamba2": "Mamba2",
          "gla-nogate": "GLA, no gate"}
#: The paper's Table 2 (Wikitext perplexity, 340M parameters / 15B tokens; Mamba2 is not in the paper).
PAPER_WIKITEXT_PPL_340M = {"transformer": 28.39, "retnet": 32.33, "mamba": 28.39, "gla": 28.65}
PAPER_WIKITEXT_PPL_1_3B = {"transformer": 16.85, "retnet": 18.64, "mamba": 17.06, "gla": 17.22}
#: The paper's Table 4 (training perplexity, 340M / 7B tokens): gate ablation rows and the runs standing for them.
ABLATION_ROWS = (("gla", "per-key data-dependent gate (GLA)", 14.77),
                 ("mamba2", "data-dependent scalar gate (Mamba2/SSD)", 15.56),
                 ("retnet", "fixed scalar decay (RetNet)", 16.55),
                 ("gla-nogate", "no gate (GLA, gate=none)", 23.21))
MAMBA2_STATES = (16, 32, 64, 128)


# ----------------------------------------------------------------------------------------------------------------
# Shapes at matched parameter counts


def count_params(arch: str, fields: dict) -> int:
    """Parameters of the ``arch`` model with config ``fields`` (shapes only: nothing is allocated)."""
    import jax
    from flax import nnx

    from gla_jax.models import build_model
    from gla_jax.models.registry import get_family

    config = get_family(arch).config_class(**fields)
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def family_fields(kind: str, *, width: int, layers: int, heads: int, vocab: int, train_len: int,
                  attn_head_dim: int = 16) -> tuple[str, dict]:
    """(``model.arch``, model config fields) of ``kind`` (FAMILIES or "gla-nogate") at ``width``/``layers``/
    ``heads``, with the free knob (RetNet's MLP width, Mamba2's state size) chosen so the parameter count is the
    closest to GLA's of the same width and depth."""
    shared = dict(hidden_size=width, vocab_size=vocab, tie_word_embeddings=True)
    if kind in ("gla", "gla-nogate"):
        return "gla", dict(shared, num_hidden_layers=layers, num_heads=heads,
                           **({"gate": "none"} if kind == "gla-nogate" else {}))
    if kind == "transformer":
        if width % attn_head_dim:
            raise ValueError(f"--width: expected a multiple of the attention head width {attn_head_dim}, got {width}")
        return "transformer", dict(shared, num_hidden_layers=layers, num_heads=width // attn_head_dim,
                                   max_position_embeddings=train_len)
    target = count_params("gla", family_fields("gla", width=width, layers=layers, heads=heads, vocab=vocab,
                                                train_len=train_len)[1])
    if kind == "retnet":
        base = dict(shared, num_hidden_layers=layers, num_heads=heads)
        # the count is linear in the MLP width: solve for it from two points, on a grid of 16
        c16, c32 = (count_params("retnet", dict(base, intermediate_size=i)) for i in (16, 32))
        width_mlp = 16 + 16 * max(0, round((target - c16) / (c32 - c16)))
        return "retnet", dict(base, intermediate_size=width_mlp)
    if kind == "mamba":
        return "mamba", dict(shared, num_hidden_layers=2 * layers, expand=2, state_size=16, initializer_range=0.02)
    if kind == "mamba2":
        if (2 * width) % heads:
            raise ValueError(f"--heads: expected a divisor of 2 x width = {2 * width}, got {heads}")
        base = dict(shared, num_hidden_layers=2 * layers, num_heads=heads, head_dim=2 * width // heads, expand=2,
                    n_groups=1, chunk_size=64, initializer_range=0.02)
        options = [dict(base, state_size=n) for n in MAMBA2_STATES]
        return "mamba2", min(options, key=lambda f: abs(count_params("mamba2", f) - target))
    raise ValueError(f"kind: expected one of {FAMILIES + ('gla-nogate',)}, got {kind!r}")


def overrides(kind: str, args) -> dict:
    """Dotted overrides of the library's training config for ``kind``: the family's matched shape plus the shared
    data/optimizer/loop settings (common.run_overrides), with a checkpoint for the long evaluation."""
    arch, fields = family_fields(kind, width=args.width, layers=args.layers, heads=args.heads, vocab=args.vocab,
                                 train_len=args.train_len)
    # the family's "-tiny" preset (it replaces the default config's GLA-shaped model fields), every size overridden
    return {"model.preset": f"{arch}-tiny", "model.arch": arch, "model.overrides": fields,
            **C.run_overrides(args, seq_len=args.train_len, eval_batches=args.eval_batches, checkpoint=True)}


# ----------------------------------------------------------------------------------------------------------------
# The runs


def lm_run(kind: str, args) -> tuple[dict, dict]:
    """Trains and evaluates ``kind``; returns (summary row, the evaluation of ``gla-jax eval``)."""
    import tempfile

    workdir = (args.workdir / kind) if args.workdir else pathlib.Path(tempfile.mkdtemp(prefix=f"cmp_{kind}_"))
    ov = overrides(kind, args)
    t = C.timer()
    summary, _, _ = C.library_train(workdir, ov)
    secs = t()
    t = C.timer()
    ev = C.library_eval(workdir, seq_len=args.train_len * args.factor, batches=args.long_eval_batches,
                        batch_size=args.long_eval_batch, overrides=[f"mesh.data={args.mesh_data}"])
    eval_secs = t()
    losses = summary["losses"]
    train_loss, val_loss = C.final_train_loss(losses), float(summary["eval_loss"])
    beyond = [b for b in ev["buckets"] if b["start"] >= args.train_len and b["loss"] is not None]
    every = max(1, len(losses) // 100)
    row = {"model": kind, "label": LABELS[kind], "arch": ov["model.arch"], "model_fields": ov["model.overrides"],
           "params": int(summary["n_params"]),
           "params_non_embedding": int(summary["n_params"]) - args.vocab * args.width,
           "train_loss": train_loss, "train_ppl": math.exp(train_loss), "val_loss": val_loss,
           "val_ppl": math.exp(val_loss), "eval_ppl_within_train_len": ev["ppl"],
           "eval_ppl_last_bucket": beyond[-1]["ppl"] if beyond else None,
           "buckets": [{k: b[k] for k in ("start", "end", "tokens", "loss", "ppl")} for b in ev["buckets"]],
           "train_seconds": secs, "eval_seconds": eval_secs, "tokens": args.steps * args.batch * args.train_len,
           "curve": [{"step": s, "loss": losses[s]} for s in sorted(losses) if s % every == 0 or s == args.steps],
           "paper_wikitext_ppl_340m": PAPER_WIKITEXT_PPL_340M.get(kind),
           "paper_wikitext_ppl_1_3b": PAPER_WIKITEXT_PPL_1_3B.get(kind)}
    return row, ev


def mqar_run(kind: str, args) -> dict:
    """MQAR accuracy of ``kind``'s matched shape at ``--mqar-width`` (experiments/mqar.py's data, library training
    loop with the loss on query positions, and accuracy over query positions of a fixed test set)."""
    from flax import nnx

    from gla_jax.models import build_model
    from gla_jax.models.registry import get_family

    seq_len, n_kv = args.mqar_seq_len, args.mqar_pairs
    arch, fields = family_fields(kind, width=args.mqar_width, layers=args.mqar_layers, heads=args.mqar_heads,
                                 vocab=args.mqar_vocab, train_len=seq_len)
    model = build_model(get_family(arch).config_class(**fields), rngs=nnx.Rngs(args.seed))
    test = mqar.mqar_batch(np.random.default_rng(10_000 + args.seed), args.mqar_test, seq_len, n_kv,
                           args.mqar_vocab, random_non_queries=False)
    rng = np.random.default_rng(args.seed)

    def batches():
        while True:
            x, y, m = mqar.mqar_batch(rng, args.mqar_batch, seq_len, n_kv, args.mqar_vocab, random_non_queries=False)
            yield {"tokens": x, "targets": y, "weights": m.astype(np.float32)}

    train_args = argparse.Namespace(steps=args.mqar_steps, lr=args.mqar_lr, weight_decay=0.1)
    apply, params, last, secs = mqar.train(model, batches(), train_args)
    acc = mqar.evaluate(apply, params, test)
    return {"mqar_params": mqar.count_params(model), "mqar_test_acc": acc, "mqar_final_train_loss": last["loss"],
            "mqar_train_seconds": secs}


def run(args) -> dict:
    started = C.utc_now()
    config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    config.update(eval_len=args.train_len * args.factor,
                  tokens_per_family=args.steps * args.batch * args.train_len,
                  trainer="gla_jax.train.trainer.Trainer + gla_jax.train.evaluate.evaluate_run (gla-jax train / eval)",
                  mqar=f"experiments/mqar.py data/train/evaluate: seq {args.mqar_seq_len}, {args.mqar_pairs} pairs, "
                       f"vocab {args.mqar_vocab}, zero fill, {args.mqar_steps} steps of {args.mqar_batch}")
    rows, evals = [], {}
    kinds = list(dict.fromkeys(list(args.models) + (["gla-nogate"] if args.ablation else [])))
    for kind in kinds:
        row, ev = lm_run(kind, args)
        evals[kind] = ev
        if args.mqar and kind in FAMILIES:
            row.update(mqar_run(kind, args))
        rows.append(row)
        print(f"  {LABELS[kind]:14s} params {row['params']:>9,d}  held-out ppl {row['val_ppl']:7.3f}  last bucket "
              f"{row['eval_ppl_last_bucket'] if row['eval_ppl_last_bucket'] is None else round(row['eval_ppl_last_bucket'], 3)}"
              f"  MQAR {row.get('mqar_test_acc', float('nan')):.3f}  ({row['train_seconds']:.0f}s)", flush=True)
        write(args, config, started, rows, final=False)
    path = write(args, config, started, rows, final=True)
    print(C.format_table([{k: r.get(k) for k in ("label", "params", "train_ppl", "val_ppl", "eval_ppl_last_bucket",
                                                   "mqar_test_acc", "paper_wikitext_ppl_340m", "train_seconds")}
                          for r in rows]))
    gla = next((r for r in rows if r["model"] == "gla"), None)
    print(C.format_table(ablation_table(rows, gate_ablation_rows(args, gla_row=gla) if gla else None)))
    if not args.no_plot:
        plot(rows, args)
    return {"json": path, "rows": rows}


def ablation_table(rows: list[dict], gla_variants: dict | None = None) -> list[dict]:
    """The paper's gate-ablation rows from the runs that stand for them (those that ran); the no-gate row from
    ``gla_variants`` (:func:`gate_ablation_rows`) when it was not trained here."""
    by = {r["model"]: r for r in rows}
    if "gla-nogate" not in by and gla_variants:
        by.update({"gla-nogate": {**r, "label": "GLA, gate=none (gate_ablation.json)"}
                   for r in gla_variants["rows"] if r["variant"] == "none"})
    return [{"row": label, "run": by[kind].get("label", LABELS[kind]), "train_ppl": by[kind]["train_ppl"],
             "val_ppl": by[kind]["val_ppl"], "paper_train_ppl": paper}
            for kind, label, paper in ABLATION_ROWS if kind in by]


#: Flags that must equal gate_ablation.py's for its GLA gate variants to sit beside this run's rows.
GATE_ABLATION_SHARED = ("width", "layers", "heads", "batch", "steps", "lr", "weight_decay", "dtype", "source",
                        "tokenizer", "vocab", "val_fraction", "eval_batches", "seed")


def gate_ablation_rows(args, path: pathlib.Path | None = None, gla_row: dict | None = None) -> dict | None:
    """GLA's own gate variants (scalar, fixed, none) from ``results/gate_ablation.json`` when that run had this
    run's width, depth, heads, data, budget and optimizer (the same training setup, so its rows sit beside the
    families' rows) and, given this run's ``gla_row``, its GLA row has the same held-out perplexity (within 1%: the
    same code and data); None when the file is absent or any of that differs."""
    import json

    path = path or C.RESULTS_DIR / "gate_ablation.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    cfg = {**doc["config"], "heads": 4}  # gate_ablation's 4-head variants
    ours = {**vars(args), "seq_len": args.train_len}
    if any(cfg.get(k) != ours.get(k) for k in GATE_ABLATION_SHARED) or cfg.get("seq_len") != ours["seq_len"]:
        return None
    theirs = {r["variant"]: r for r in doc["results"]}
    if gla_row is not None and not ("gla" in theirs and abs(theirs["gla"]["val_ppl"] / gla_row["val_ppl"] - 1) < 0.01):
        return None  # trained by other code or data: its rows do not sit beside ours
    keep = ("variant", "gate", "params", "train_ppl", "val_ppl", "paper_train_ppl")
    return {"source": "experiments/results/gate_ablation.json", "git_commit": doc["env"].get("git_commit"),
            "rows": [{k: r[k] for k in keep} for r in doc["results"] if r["heads"] == 4]}


def param_spread(rows: list[dict]) -> float | None:
    """max/min - 1 of the compared families' parameter counts."""
    counts = [r["params"] for r in rows if r["model"] in FAMILIES]
    return max(counts) / min(counts) - 1 if counts else None


def write(args, config, started, rows, *, final: bool) -> pathlib.Path:
    """(Re)writes ``<name>.json`` with the rows so far (``complete`` false until the last family)."""
    gla = next((r for r in rows if r["model"] == "gla"), None)
    variants = gate_ablation_rows(args, gla_row=gla) if gla else None
    order = [r["model"] for r in sorted((r for r in rows if r["model"] in FAMILIES), key=lambda r: r["val_loss"])]
    extra = {"complete": final, "held_out_order": order, "param_spread": param_spread(rows),
             "ablation": ablation_table(rows, variants), "gla_gate_variants": variants,
             "paper_ablation_order": ["gla", "mamba2", "retnet", "gla-nogate"],
             "paper_wikitext_ppl_340m": PAPER_WIKITEXT_PPL_340M, "paper_wikitext_ppl_1_3b": PAPER_WIKITEXT_PPL_1_3B}
    return C.write_results(args.name, config=config, seed=args.seed, results=rows, out_dir=args.out, started=started,
                           extra=extra, replace=True)


def plot(rows, args):
    plt = C.pyplot()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.2))
    for r in rows:
        a1.plot([h["step"] for h in r["curve"]], [math.exp(min(h["loss"], 20)) for h in r["curve"]], label=r["label"])
        pts = [((b["start"] + b["end"]) / 2, b["ppl"]) for b in r["buckets"] if b["ppl"] is not None]
        a2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r["label"])
    a1.set_yscale("log")
    a1.set(xlabel="step", ylabel="training perplexity (byte level)")
    a2.axvline(args.train_len, color="gray", ls="--", label=f"training length {args.train_len}")
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set(xlabel="position in document (bucket centre)", ylabel="held-out perplexity")
    fam = [r for r in rows if "mqar_test_acc" in r]
    a3.bar(range(len(fam)), [r["mqar_test_acc"] for r in fam])
    a3.set_xticks(range(len(fam)), [r["label"] for r in fam], rotation=15)
    a3.set(ylim=(0, 1.02), ylabel="MQAR accuracy (query positions)",
           title=f"MQAR: seq {args.mqar_seq_len}, {args.mqar_pairs} pairs, width {args.mqar_width}")
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    return C.save_figure(fig, args.out, args.name)


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(FAMILIES), choices=FAMILIES + ("gla-nogate",),
                   help="families to train (gla-nogate: GLA with gate=none, the ablation's no-gate row; no MQAR)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2, help="depth of GLA/Transformer++/RetNet (Mamba, Mamba2: 2x)")
    p.add_argument("--heads", type=int, default=4, help="GLA, RetNet and Mamba2 heads")
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--factor", type=int, default=16, help="evaluate positions up to factor x train-len")
    C.add_run_flags(p, batch=16, steps=200)
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches at the training length")
    p.add_argument("--long-eval-batches", type=int, default=4, help="held-out batches of the long evaluation")
    p.add_argument("--long-eval-batch", type=int, default=4, help="rows (of factor x train-len tokens) per batch")
    p.add_argument("--nogate-run", dest="ablation", action="store_true",
                   help="also train GLA with gate=none here (the ablation's no-gate row); without it the row comes "
                        "from results/gate_ablation.json when that run's settings equal these")
    p.add_argument("--no-mqar", dest="mqar", action="store_false", help="skip MQAR")
    p.add_argument("--mqar-width", type=int, default=64)
    p.add_argument("--mqar-layers", type=int, default=2)
    p.add_argument("--mqar-heads", type=int, default=2)
    p.add_argument("--mqar-seq-len", type=int, default=32)
    p.add_argument("--mqar-pairs", type=int, default=4)
    p.add_argument("--mqar-vocab", type=int, default=64)
    p.add_argument("--mqar-steps", type=int, default=300)
    p.add_argument("--mqar-batch", type=int, default=32)
    p.add_argument("--mqar-lr", type=float, default=3e-3)
    p.add_argument("--mqar-test", type=int, default=512, help="MQAR test examples")
    p.add_argument("--workdir", type=pathlib.Path, default=None,
                   help="keep each model's run (metrics, checkpoint) in WORKDIR/<model> (default: temporary)")
    p.add_argument("--name", default="compare_models", help="results file stem")
    args = p.parse_args(argv)
    if args.smoke:
        args.width, args.layers, args.heads, args.train_len, args.factor = 32, 1, 2, 32, 4
        args.batch, args.steps, args.eval_batches, args.long_eval_batches, args.long_eval_batch = 2, 3, 1, 1, 2
        args.mqar_width, args.mqar_layers, args.mqar_seq_len, args.mqar_pairs = 16, 1, 32, 4
        args.mqar_steps, args.mqar_batch, args.mqar_test = 3, 4, 16
        args.name = args.name if args.name != "compare_models" else "compare_models_smoke"
    for flag in ("width", "layers", "heads", "train_len", "factor", "mqar_width", "mqar_layers", "mqar_heads",
                 "mqar_steps", "mqar_batch", "mqar_test"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')}: expected >= 1, got {getattr(args, flag)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    C.refuse_overwrite(args.out, args.name, args.replace or args.smoke)
    print(f"compare models: {args.models}; width {args.width}, {args.layers} layers; {args.steps} steps of "
          f"{args.batch} x {args.train_len} tokens ({args.steps * args.batch * args.train_len:,d} per model); "
          f"evaluated to {args.train_len * args.factor}", flush=True)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
