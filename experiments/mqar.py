"""Experiment 1: multi-query associative recall (MQAR, the Zoology synthetic task).

Each example is a sequence of ``seq_len`` tokens that starts with ``num_kv_pairs`` key-value pairs
``k1 v1 k2 v2 ...`` (keys drawn without replacement from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``); in the
rest of the sequence every key appears once more, as a query, at an even offset chosen without replacement with
probability proportional to ``gap ** (power_a - 1)`` (short gaps favoured; ``power_a`` = 0.01 as in the
literature). The model must output the key's value at the query position; only query positions are scored.
Positions that are neither context nor query hold token 0 by default, or random tokens with ``--random-fill`` (the
literature's choice, made with a vocabulary of 8192; in a small vocabulary a random token often repeats a key).

Models (2 layers, 2 heads, as in the GLA paper's MQAR figure): GLA, data-dependent scalar gate, fixed per-head
decay (RetNet-style), no gate (plain linear attention), all four with fla's short convolution (``--no-conv`` drops
it), and Transformer++ (softmax attention), over model widths.
Expected at full size: attention ~100%; GLA above fixed decay and no gate.

    python experiments/mqar.py                  # CPU default: seq 32, 4 pairs, vocab 64, widths 32/64, 1000
                                                # steps of 64 (about half an hour on 2 cores)
    python experiments/mqar.py --smoke          # seconds; the pipeline only
    python experiments/mqar.py --paper          # the literature's setting (vocab 8192, seq 256/512, 16/64 pairs,
                                                # widths 64-512): a GPU job
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common as C  # noqa: E402

MODELS = ("gla", "scalar", "fixed", "none", "transformer")
LABELS = {"gla": "GLA", "scalar": "scalar gate", "fixed": "fixed decay (RetNet-style)", "none": "no gate",
          "transformer": "Transformer++"}


# ----------------------------------------------------------------------------------------------------------------
# Data


def _check_mqar_args(batch, seq_len, num_kv_pairs, vocab_size, power_a):
    for name, v in (("batch", batch), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs),
                    ("vocab_size", vocab_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if seq_len % 2:
        raise ValueError(f"seq_len: expected an even length, got {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"num_kv_pairs: expected 4 * num_kv_pairs <= seq_len ({seq_len}), got {num_kv_pairs}")
    if vocab_size < 2 * num_kv_pairs + 2:
        raise ValueError(f"vocab_size: expected >= 2 * num_kv_pairs + 2 = {2 * num_kv_pairs + 2}, got {vocab_size}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a: expected 0 < power_a <= 1, got {power_a}")


def mqar_batch(rng: np.random.Generator, batch: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
               power_a: float = 0.01, random_non_queries: bool = True):
    """A batch of MQAR examples.

    Returns ``(inputs [batch, seq_len] int32, targets [batch, seq_len] int32, mask [batch, seq_len] bool)``:
    ``targets[b, t]`` is the value of the key ``inputs[b, t]`` where ``mask[b, t]`` (a query position) and 0
    elsewhere. Exactly ``num_kv_pairs`` query positions per row, all after the ``2 * num_kv_pairs`` context tokens.
    """
    _check_mqar_args(batch, seq_len, num_kv_pairs, vocab_size, power_a)
    n = num_kv_pairs
    half = vocab_size // 2
    ctx = 2 * n
    # Keys from [1, half), values from [half, vocab): distinct within a row (top-n of a random permutation).
    keys = np.argsort(rng.random((batch, half - 1)), axis=1)[:, :n] + 1
    values = np.argsort(rng.random((batch, vocab_size - half)), axis=1)[:, :n] + half
    # Query slots: the rest of the sequence has (seq_len - ctx) // 2 even offsets; choose n of them without
    # replacement with weights gap^(a-1) (Gumbel top-k == sequential sampling without replacement).
    space = (seq_len - ctx) // 2
    logw = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    gumbel = -np.log(-np.log(rng.random((batch, space)).clip(1e-300, 1.0)))
    gaps = np.argsort(-(logw + gumbel), axis=1)[:, :n]
    qpos = ctx + 2 * gaps  # [batch, n]; the j-th key is queried at qpos[:, j]

    if random_non_queries:
        inputs = rng.integers(0, vocab_size, size=(batch, seq_len))
    else:
        inputs = np.zeros((batch, seq_len), np.int64)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    rows = np.arange(batch)[:, None]
    inputs[rows, qpos] = keys
    targets = np.zeros((batch, seq_len), np.int64)
    targets[rows, qpos] = values
    mask = np.zeros((batch, seq_len), bool)
    mask[rows, qpos] = True
    return inputs.astype(np.int32), targets.astype(np.int32), mask


# ----------------------------------------------------------------------------------------------------------------
# Models


def build_model(kind: str, *, width: int, vocab_size: int, seq_len: int, layers: int = 2, heads: int = 2,
                seed: int = 0, impl: str = "auto", short_conv: bool = True):
    """A ``layers``-deep language model of ``width`` for ``kind`` in MODELS (a GLA gate variant or Transformer++).

    ``short_conv``: the GLA variants get fla's short convolution on q/k/v (``use_short_conv``, kernel 4), as the
    linear-attention models of the recall literature do; Transformer++ never has one."""
    from flax import nnx

    from gla_jax.models import GLAConfig, TransformerConfig, build_model

    if kind not in MODELS:
        raise ValueError(f"kind: expected one of {MODELS}, got {kind!r}")
    rngs = nnx.Rngs(seed)
    shared = dict(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_heads=heads,
                  tie_word_embeddings=True)
    if kind == "transformer":
        config = TransformerConfig(**shared, max_position_embeddings=seq_len)
    else:  # the GLA gate variants
        config = GLAConfig(**shared, gate=kind, impl=impl, use_short_conv=short_conv)
    return build_model(config, rngs=rngs)


# ----------------------------------------------------------------------------------------------------------------
# The experiment


def evaluate(apply, params, data) -> float:
    """Accuracy over query positions of ``data = (inputs, targets, mask)`` (numpy), in batches of 64."""
    import jax
    import jax.numpy as jnp

    predict = jax.jit(lambda params, x: jnp.argmax(apply(params, x), axis=-1))
    x, y, m = data
    correct = total = 0
    for i in range(0, len(x), 64):
        pred = np.asarray(predict(params, jnp.asarray(x[i:i + 64])))
        correct += int(((pred == y[i:i + 64]) & m[i:i + 64]).sum())
        total += int(m[i:i + 64].sum())
    return correct / max(total, 1)


def train(model, batches, args):
    """Trains ``model``'s parameters with the library's train step and loop (AdamW of ``gla_jax.train.optim``, the
    loss weighted to the query positions); returns (apply, params, last logged metrics, seconds)."""
    import jax

    from gla_jax.train import optim, step
    from gla_jax.train.config import OptimSection
    from gla_jax.train.loop import Loop
    from gla_jax.train.metrics import Progress

    apply, params = step.split_model(model)
    warmup = max(1, min(args.steps // 10, 100))
    tx = optim.make_optimizer(OptimSection(lr=args.lr, warmup_steps=warmup, weight_decay=args.weight_decay),
                              args.steps)
    train_step = jax.jit(step.make_train_step(apply, tx, accuracy=True), donate_argnums=(0, 1))

    def step_fn(state, batch):
        params, opt_state, metrics = train_step(*state, batch)
        return (params, opt_state), metrics

    last = {}

    def record(info):
        last.update({k: float(v) for k, v in info.metrics.items()})

    t = C.timer()
    loop = Loop(step_fn).add_hook(record, every=max(1, args.steps // 20))
    (params, _), _, _ = loop.run((params, tx.init(params)), batches, 0, args.steps)
    jax.block_until_ready(params)
    return apply, params, last, t()


def run(args) -> dict:
    started = C.utc_now()
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings]
    rows = []
    for seq_len, n_kv in settings:
        test = mqar_batch(np.random.default_rng(10_000 + args.seed), args.test_examples, seq_len, n_kv, args.vocab,
                          random_non_queries=args.random_fill)
        for width in args.widths:
            for kind in args.models:
                rng = np.random.default_rng(args.seed)
                model = build_model(kind, width=width, vocab_size=args.vocab, seq_len=seq_len, layers=args.layers,
                                    heads=args.heads, seed=args.seed, short_conv=not args.no_conv)

                def batches(rng=rng, seq_len=seq_len, n_kv=n_kv):
                    while True:
                        x, y, m = mqar_batch(rng, args.batch, seq_len, n_kv, args.vocab,
                                             random_non_queries=args.random_fill)
                        yield {"tokens": x, "targets": y, "weights": m.astype(np.float32)}

                n_params = count_params(model)
                apply, params, last, secs = train(model, batches(), args)
                acc = evaluate(apply, params, test)
                row = {"model": kind, "width": width, "seq_len": seq_len, "num_kv_pairs": n_kv,
                       "params": n_params, "steps": args.steps, "final_train_loss": last["loss"],
                       "final_train_acc": last["accuracy"], "test_acc": acc, "train_seconds": secs}
                rows.append(row)
                print(f"  {LABELS[kind]:28s} width {width:4d}  T {seq_len:4d}  kv {n_kv:3d}  "
                      f"test acc {acc:.3f}  ({secs:.0f}s)", flush=True)
    config = {k: (v if not isinstance(v, pathlib.Path) else str(v)) for k, v in vars(args).items()}
    extra = None
    if args.extend:
        rows, extra = extend_rows(pathlib.Path(args.out) / f"{args.name}.json", config, rows)
    path = C.write_results(args.name, config=config, seed=args.seed, results=rows, out_dir=args.out, started=started,
                           extra=extra, replace=True)
    print(C.format_table(rows, ["model", "width", "seq_len", "num_kv_pairs", "params", "final_train_loss",
                                "test_acc", "train_seconds"]))
    if not args.no_plot:
        plot(rows, args.out, args.name)
    return {"json": path, "rows": rows}


def count_params(model) -> int:
    """Number of trainable parameters of an NNX module."""
    import jax
    from flax import nnx

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# Settings that must match for rows of two runs to share one results file (``--extend``).
SHARED_CONFIG = ("vocab", "layers", "heads", "steps", "batch", "lr", "weight_decay", "test_examples", "seed",
                 "random_fill", "no_conv")


def extend_rows(path: pathlib.Path, config: dict, rows: list[dict]):
    """Rows of the earlier results file at ``path`` that this run did not redo, followed by ``rows``; and a record
    of the earlier run. Raises ValueError naming the first training setting that differs between the two runs."""
    import json

    if not path.exists():
        return rows, None
    old = json.loads(path.read_text())
    for key in SHARED_CONFIG:
        if old["config"].get(key) != config.get(key):
            raise ValueError(f"--{key.replace('_', '-')}: {config.get(key)!r} differs from {old['config'].get(key)!r} "
                             f"in {path.name}; --extend joins runs of the same settings only")
    ident = lambda r: (r["model"], r["width"], r["seq_len"], r["num_kv_pairs"])
    redone = {ident(r) for r in rows}
    kept = [r for r in old["results"] if ident(r) not in redone]
    earlier = {"started": old["started"], "finished": old["finished"], "git_commit": old["env"].get("git_commit"),
               "argv": old["env"].get("argv"), "rows": len(kept)}
    return kept + rows, {"extends": [*old.get("extends", []), earlier]}


def plot(rows, out_dir, name):
    plt = C.pyplot()
    settings = sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, (t, n) in zip(axes[0], settings):
        for kind in MODELS:
            pts = sorted((r["width"], r["test_acc"]) for r in rows
                         if r["model"] == kind and r["seq_len"] == t and r["num_kv_pairs"] == n)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS[kind])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("model width")
        ax.set_ylabel("MQAR accuracy (query positions)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"seq {t}, {n} key-value pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return C.save_figure(fig, out_dir, name)


def parse_args(argv=None):
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--widths", nargs="+", type=int, default=[32, 64])
    p.add_argument("--settings", nargs="+", default=["32:4"], help="seq_len:num_kv_pairs pairs")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--test-examples", type=int, default=512)
    p.add_argument("--no-conv", action="store_true", help="GLA variants without the short convolution")
    p.add_argument("--random-fill", action="store_true",
                   help="fill non-query positions with random tokens (the literature's default; with a small "
                        "vocabulary they often repeat a key, which makes recall ambiguous)")
    p.add_argument("--paper", action="store_true",
                   help="the literature's setting: vocab 8192, seq 256 (16 pairs) and 512 (64 pairs), widths "
                        "64-512, 20k steps of batch 256 (a GPU job)")
    p.add_argument("--name", default="mqar", help="results file stem")
    p.add_argument("--extend", action="store_true",
                   help="add this run's rows to an existing results file of the same name and settings (e.g. one "
                        "more width), replacing rows it redoes")
    args = p.parse_args(argv)
    if args.smoke:
        args.widths, args.settings, args.vocab, args.steps = [16], ["32:4"], 64, 3
        args.batch, args.test_examples = 4, 16
        args.name = args.name if args.name != "mqar" else "mqar_smoke"
    elif args.paper:
        args.widths, args.settings, args.vocab = [64, 128, 256, 512], ["256:16", "512:64"], 8192
        args.steps, args.batch, args.lr, args.test_examples = 20_000, 256, 1e-3, 3000
        args.random_fill = True
    return args


def main(argv=None):
    args = parse_args(argv)
    C.refuse_overwrite(args.out, args.name, args.replace or args.smoke or args.extend)
    print(f"MQAR: models {args.models}, widths {args.widths}, settings {args.settings}, vocab {args.vocab}, "
          f"{args.steps} steps of batch {args.batch}")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
