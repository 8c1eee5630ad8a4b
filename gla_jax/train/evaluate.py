"""``gla-jax eval --workdir W``: held-out loss/perplexity of a run, and perplexity per position bucket.

The held-out documents are packed (unshuffled) into rows of ``--seq-len`` tokens (default: 4x the training length).
Each position is credited to the bucket of its offset inside its document segment (the context the model has seen,
since the recurrent state starts fresh at every segment): ``[0, L)``, ``[L, 2L)``, ``[2L, 4L)``, ... with ``L`` the
training sequence length, so the buckets past ``L`` measure length extrapolation. Results are printed and written to
``<workdir>/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def _parser():
    p = argparse.ArgumentParser(prog="gla-jax eval", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a training run directory (config.yaml + checkpoints/)")
    p.add_argument("--checkpoint", default=None,
                   help="parameters to evaluate: a step folder or save_params folder (default: newest in workdir)")
    p.add_argument("--seq-len", type=int, default=0, help="evaluation row length (default 4x training length)")
    p.add_argument("--batches", type=int, default=8, help="number of held-out batches (default 8)")
    p.add_argument("--batch-size", type=int, default=0, help="rows per batch (default: training batch size)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. data.source=...)")
    return p


def bucket_edges(train_len: int, seq_len: int) -> list[int]:
    """[0, L, 2L, 4L, ..., seq_len] (just [0, seq_len] when seq_len <= L)."""
    edges, e = [0], train_len
    while e < seq_len:
        edges.append(e)
        e *= 2
    edges.append(seq_len)
    return edges


def segment_offsets(segment_ids: np.ndarray) -> np.ndarray:
    """[B, T] offset of each position inside its segment (0 at every segment start)."""
    seg = np.asarray(segment_ids)
    B, T = seg.shape
    idx = np.broadcast_to(np.arange(T), (B, T))
    start = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    start_idx = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    return idx - start_idx


def evaluate_run(workdir, *, checkpoint=None, seq_len=0, batches=8, batch_size=0, overrides=(), log=print) -> dict:
    import jax

    from gla_jax.train import checkpoint as ckpt_lib
    from gla_jax.train import config as config_lib
    from gla_jax.train import data as data_lib
    from gla_jax.train import loop

    workdir = Path(workdir)
    if not (workdir / "config.yaml").is_file():
        raise ValueError(f"--workdir: {workdir} has no config.yaml (not a training run directory)")
    cfg = config_lib.load_config(workdir / "config.yaml", list(overrides))
    cfg.checkpoint.enabled = False
    trainer = loop.Trainer(cfg, workdir, log=log)
    params = ckpt_lib.load_params(checkpoint or workdir, target=trainer.abs_params)
    train_len = cfg.data.seq_len
    L = seq_len or 4 * train_len
    bs = batch_size or cfg.data.batch_size
    _, val = data_lib.list_documents(cfg.data, trainer.tokenizer)
    if not len(val):
        raise ValueError("data.val_fraction: the run has no held-out documents")
    edges = bucket_edges(train_len, L)
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1)
    from jax.sharding import NamedSharding

    from gla_jax.train import sharding as shard_lib

    bsh = NamedSharding(trainer.mesh, shard_lib.batch_spec(trainer.mesh, bs))
    repl = shard_lib.replicated(trainer.mesh)

    def nll_fn(p, tokens, seg):
        return loop._position_nll(trainer._apply(p, tokens, seg), tokens, seg)

    fn = jax.jit(nll_fn, in_shardings=(trainer.param_shardings, bsh, bsh), out_shardings=(repl, repl))
    it = data_lib.make_batches(cfg.data, val, process_index=jax.process_index(), process_count=jax.process_count(),
                               shuffle=False, repeat=True, batch_size=bs, seq_len=L)
    with loop.mesh_context(trainer.mesh):
        for _ in range(batches):
            local = next(it)
            g = {k: jax.make_array_from_process_local_data(bsh, v, (bs, L)) for k, v in local.items()}
            nll, mask = fn(params, g["tokens"], g["segment_ids"])
            nll, mask = np.asarray(jax.device_get(nll)), np.asarray(jax.device_get(mask))
            seg = np.asarray(jax.device_get(g["segment_ids"]))
            off = segment_offsets(seg)
            for i in range(len(edges) - 1):
                sel = (off >= edges[i]) & (off < edges[i + 1])
                sums[i] += (nll * sel).sum()
                counts[i] += (mask * sel).sum()
    train_sel = [i for i in range(len(edges) - 1) if edges[i + 1] <= train_len]
    tl = sums[train_sel].sum() / max(counts[train_sel].sum(), 1)
    result = {
        "train_seq_len": train_len, "eval_seq_len": L, "tokens": int(counts.sum()),
        "loss": float(tl), "ppl": math.exp(min(tl, 50.0)),
        "loss_all_positions": float(sums.sum() / max(counts.sum(), 1)),
        "buckets": [{"start": int(edges[i]), "end": int(edges[i + 1]), "tokens": int(counts[i]),
                     "loss": float(sums[i] / counts[i]) if counts[i] else None,
                     "ppl": math.exp(min(sums[i] / counts[i], 50.0)) if counts[i] else None}
                    for i in range(len(edges) - 1)],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    from gla_jax.train import distributed
    from gla_jax.train.config import load_config

    try:
        wd = Path(args.workdir)
        if (wd / "config.yaml").is_file():
            distributed.initialize(load_config(wd / "config.yaml").distributed)
        res = evaluate_run(args.workdir, checkpoint=args.checkpoint, seq_len=args.seq_len, batches=args.batches,
                           batch_size=args.batch_size, overrides=args.overrides)
    except ValueError as e:
        from gla_jax.train.cli import _is_user_error

        if not _is_user_error(e):
            raise
        print(f"gla-jax eval: error: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() == 0:
        print(f"held-out loss {res['loss']:.4f}  ppl {res['ppl']:.3f}  (positions < {res['train_seq_len']}, "
              f"{res['tokens']} tokens evaluated in rows of {res['eval_seq_len']})")
        print(f"{'positions':>16}  {'tokens':>8}  {'loss':>8}  {'ppl':>9}")
        for b in res["buckets"]:
            loss = f"{b['loss']:.4f}" if b["loss"] is not None else "-"
            ppl = f"{b['ppl']:.3f}" if b["ppl"] is not None else "-"
            print(f"{b['start']:>7}-{b['end']:<8}  {b['tokens']:>8}  {loss:>8}  {ppl:>9}")
        (Path(args.workdir) / "eval.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
