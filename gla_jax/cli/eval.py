"""``gla-jax eval --workdir W``: held-out loss/perplexity of a run, and perplexity per position bucket.

The held-out documents are packed (unshuffled) into rows of ``--seq-len`` tokens (default: 4x the training length);
positions are bucketed by their offset inside their document (``gla_jax.train.evaluate``). The result is printed and
written to ``<workdir>/eval/step<S>_len<L>_b<N>x<B>.json``; an existing file is never overwritten unless ``--replace``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gla_jax.cli import command
from gla_jax.errors import UserError


def _parser():
    p = argparse.ArgumentParser(prog="gla-jax eval", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run directory (config.yaml + checkpoints/)")
    p.add_argument("--checkpoint", default=None,
                   help="parameters to evaluate: a step folder or save_params folder (default: newest in workdir); "
                        "one saved with its own model config outside the run (gla-jax convert --from-hf) is "
                        "evaluated as that model, any family")
    p.add_argument("--seq-len", type=int, default=0, help="evaluation row length, >= 2 (default 4x training length)")
    p.add_argument("--batches", type=int, default=8, help="number of held-out batches, >= 1 (default 8)")
    p.add_argument("--batch-size", type=int, default=0, help="rows per batch (default: training batch size)")
    p.add_argument("--replace", action="store_true", help="overwrite an earlier result of the same settings")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. data.source=...)")
    return p


@command("gla-jax eval")
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from gla_jax.train import distributed
    from gla_jax.train import evaluate as eval_lib
    from gla_jax.train.config import load_config

    eval_lib.check_options(seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size)
    wd = Path(args.workdir)
    if (wd / "config.yaml").is_file():
        distributed.initialize(load_config(wd / "config.yaml").distributed)
    options = dict(checkpoint=args.checkpoint, seq_len=args.seq_len, batches=args.batches,
                   batch_size=args.batch_size, overrides=args.overrides)
    out = eval_lib.result_path(wd, **options)
    if out.exists() and not args.replace:
        raise UserError(f"--replace: {out} already holds this evaluation; pass --replace to overwrite it")
    res = eval_lib.evaluate_run(wd, **options)
    import jax

    if jax.process_index() != 0:
        return 0
    print(f"held-out loss {res['loss']:.4f}  ppl {res['ppl']:.3f}  (positions < {res['train_seq_len']}, "
          f"{res['tokens']} tokens evaluated in rows of {res['eval_seq_len']})")
    print(f"{'positions':>16}  {'tokens':>8}  {'loss':>8}  {'ppl':>9}")
    for b in res["buckets"]:
        loss = f"{b['loss']:.4f}" if b["loss"] is not None else "-"
        ppl = f"{b['ppl']:.3f}" if b["ppl"] is not None else "-"
        print(f"{b['start']:>7}-{b['end']:<8}  {b['tokens']:>8}  {loss:>8}  {ppl:>9}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
