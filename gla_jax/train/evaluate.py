"""Held-out loss/perplexity of a training run, and perplexity per position bucket (``gla-jax eval``).

The held-out documents are packed (unshuffled) into rows of ``--seq-len`` tokens (default: 4x the training length).
Each position is credited to the bucket of its offset inside its document segment (the context the model has seen,
since the recurrent state starts fresh at every segment): ``[0, L)``, ``[L, 2L)``, ``[2L, 4L)``, ... with ``L`` the
training sequence length, so the buckets past ``L`` measure length extrapolation. The loss is the library's
(``gla_jax.train.step``); the parameters are loaded with ``gla_jax.train.load.load_model``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gla_jax.errors import UserError


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


def check_options(*, seq_len: int, batches: int, batch_size: int) -> None:
    """UserError naming the option for an evaluation that would be empty or degenerate."""
    if batches < 1:
        raise UserError(f"--batches: expected >= 1 held-out batch, got {batches}")
    if seq_len != 0 and seq_len < 2:
        raise UserError(f"--seq-len: expected >= 2 tokens per row (0: 4x the training length), got {seq_len}")
    if batch_size < 0:
        raise UserError(f"--batch-size: expected >= 1 (0: the training batch size), got {batch_size}")


def checkpoint_model_config(checkpoint: Path, workdir: Path, run_config, tokenizer_vocab: int):
    """The model config to evaluate ``checkpoint`` with. A checkpoint whose own ``model_config.json``/``config.json``
    lies outside ``workdir`` (one made by ``gla-jax convert --from-hf``, another run's) is evaluated as the model it
    was saved as (any registered family, its own sizes and options), with the run's compute ``dtype`` and ``remat``;
    a checkpoint of the run itself (or one without a config) with the run's ``run_config``. UserError naming
    ``--checkpoint`` when the model's vocabulary is smaller than the run's tokenizer's."""
    from gla_jax.train.load import config_from_file, find_model_config_file

    found = find_model_config_file(checkpoint, "--checkpoint")
    if found is None or found[0].resolve().is_relative_to(Path(workdir).resolve()):
        return run_config
    file = found[0]
    config = config_from_file(*found, "--checkpoint").replace(dtype=run_config.dtype, remat=run_config.remat)
    if config.vocab_size < tokenizer_vocab:
        raise UserError(f"--checkpoint: the model's vocabulary ({config.vocab_size}, {file}) is smaller than the "
                        f"run's tokenizer's ({tokenizer_vocab}, data.tokenizer)")
    return config


def evaluate_run(workdir, *, checkpoint=None, seq_len=0, batches=8, batch_size=0, overrides=()) -> dict:
    """The held-out evaluation of the run in ``workdir`` (its ``config.yaml``, plus ``overrides``) with the
    parameters of ``checkpoint`` (default: the run's newest step). Returns a dict: ``loss``/``ppl`` over positions
    inside the training length, ``loss_all_positions``, ``buckets`` and what was evaluated (``checkpoint``, ``step``,
    lengths, batches, tokens). The model is the run's (``config.yaml``'s model section, as trained), or for a
    ``checkpoint`` saved with its own model config outside the run (a converted one, any family) that model
    (``checkpoint_model_config``). UserError for bad options or an evaluation with no scored position."""
    import jax
    from jax.sharding import NamedSharding

    from gla_jax.train import checkpoint as ckpt_lib
    from gla_jax.train import config as config_lib
    from gla_jax.train import data as data_lib
    from gla_jax.train import sharding as shard_lib
    from gla_jax.train import step as step_lib
    from gla_jax.train.load import load_model
    from gla_jax.train.model import model_config
    from gla_jax.train.tokenizer import get_tokenizer
    from gla_jax.train.trainer import mesh_context

    check_options(seq_len=seq_len, batches=batches, batch_size=batch_size)
    workdir = Path(workdir)
    if not (workdir / "config.yaml").is_file():
        raise UserError(f"--workdir: {workdir} has no config.yaml (not a training run directory)")
    cfg = config_lib.load_config(workdir / "config.yaml", list(overrides))
    source = Path(checkpoint) if checkpoint else workdir
    params_dir = ckpt_lib.find_params_dir(source)
    mesh = shard_lib.make_mesh(cfg.mesh)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    config = model_config(cfg, tokenizer.vocab_size)
    if checkpoint:
        config = checkpoint_model_config(Path(checkpoint), workdir, config, tokenizer.vocab_size)
    _, model = load_model(source, config=config, mesh=mesh, option="--checkpoint" if checkpoint else "--workdir")
    apply, params = step_lib.split_model(model)
    train_len = cfg.data.seq_len
    L = seq_len or 4 * train_len
    bs = batch_size or cfg.data.batch_size
    _, val = data_lib.list_documents(cfg.data, tokenizer)
    if not len(val):
        raise UserError("data.val_fraction: the run has no held-out documents")
    edges = bucket_edges(train_len, L)
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1)
    bsh = NamedSharding(mesh, shard_lib.batch_spec(mesh, bs))

    def nll_fn(params, batch):
        targets, weights = step_lib.next_token_targets(batch["tokens"], batch["segment_ids"])
        logits = apply(params, batch["tokens"], batch["segment_ids"])
        return step_lib.position_nll(logits, targets, weights), weights

    fn = jax.jit(nll_fn, out_shardings=shard_lib.replicated(mesh))
    it = data_lib.make_batches(cfg.data, val, process_index=jax.process_index(), process_count=jax.process_count(),
                               shuffle=False, repeat=True, batch_size=bs, seq_len=L)
    with mesh_context(mesh):
        for _ in range(batches):
            batch = {k: jax.make_array_from_process_local_data(bsh, v, (bs, L)) for k, v in next(it).items()}
            nll, mask = (np.asarray(jax.device_get(x)) for x in fn(params, batch))
            off = segment_offsets(np.asarray(jax.device_get(batch["segment_ids"])))
            for i in range(len(edges) - 1):
                sel = (off >= edges[i]) & (off < edges[i + 1])
                sums[i] += (nll * sel).sum()
                counts[i] += (mask * sel).sum()
    train_sel = [i for i in range(len(edges) - 1) if edges[i + 1] <= train_len]
    if not counts[train_sel].sum():
        raise UserError(f"--seq-len: no held-out position inside the training length was scored ({batches} "
                        f"batch(es) of {bs} x {L} tokens)")
    tl = sums[train_sel].sum() / counts[train_sel].sum()
    step = params_dir.parent.name if params_dir.parent.name.isdigit() else None
    return {
        "checkpoint": str(params_dir.parent), "step": int(step) if step else None,
        "train_seq_len": train_len, "eval_seq_len": L, "batches": batches, "batch_size": bs,
        "tokens": int(counts.sum()), "loss": float(tl), "ppl": math.exp(min(tl, 50.0)),
        "loss_all_positions": float(sums.sum() / max(counts.sum(), 1)),
        "buckets": [{"start": int(edges[i]), "end": int(edges[i + 1]), "tokens": int(counts[i]),
                     "loss": float(sums[i] / counts[i]) if counts[i] else None,
                     "ppl": math.exp(min(sums[i] / counts[i], 50.0)) if counts[i] else None}
                    for i in range(len(edges) - 1)],
    }


def result_path(workdir, *, checkpoint=None, seq_len=0, batches=8, batch_size=0, overrides=()) -> Path:
    """Where ``gla-jax eval`` writes this evaluation: ``<workdir>/eval/step<S>_len<L>_b<N>x<B>.json`` (the folder's
    name instead of ``step<S>`` for parameters outside the run's checkpoints), so evaluations of other checkpoints or
    settings never overwrite each other. Same arguments as ``evaluate_run``."""
    from gla_jax.train import checkpoint as ckpt_lib
    from gla_jax.train import config as config_lib

    workdir = Path(workdir)
    if not (workdir / "config.yaml").is_file():
        raise UserError(f"--workdir: {workdir} has no config.yaml (not a training run directory)")
    cfg = config_lib.load_config(workdir / "config.yaml", list(overrides))
    try:
        folder = ckpt_lib.find_params_dir(Path(checkpoint) if checkpoint else workdir).parent
    except UserError as e:
        raise UserError(f"{'--checkpoint' if checkpoint else '--workdir'}: {str(e).split(': ', 1)[-1]}") from None
    label = f"step{folder.name}" if folder.name.isdigit() else folder.name
    L, bs = seq_len or 4 * cfg.data.seq_len, batch_size or cfg.data.batch_size
    return workdir / "eval" / f"{label}_len{L}_b{batches}x{bs}.json"
