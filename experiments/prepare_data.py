"""Tokenize a text corpus once, into the pre-tokenized formats the training pipeline reads fastest.

Input: JSONL files (one document per line, text in ``--text-field``) or plain text files (one document per file).
Output, one shard per input file (so the work splits over processes and SLURM array tasks):

  * ``--format arrayrecord``: ``<name>.array_record``, one record per document holding its int32 tokens (no EOS; the
    reader appends it). Random access by document; needs the ``array_record`` package.
  * ``--format npy``: ``<name>.npy``, a 1-D int32 stream of the documents' tokens, each followed by the EOS id
    (the reader splits documents after each EOS).

Then train with ``data.source='OUT/*.array_record'`` (or ``'OUT/*.npy'``) and the same ``data.tokenizer``.

    python experiments/prepare_data.py --input 'raw/train/*.jsonl' --tokenizer llama2/tokenizer.json \\
        --out tokens/train --format arrayrecord --workers 16
    # as a SLURM array (each task takes every N-th file):
    sbatch --array=0-63 --wrap "python experiments/prepare_data.py --input 'raw/**/*.jsonl' --tokenizer t.json \\
        --out tokens --task-id \\$SLURM_ARRAY_TASK_ID --num-tasks 64"
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import pathlib
import sys
import time

import numpy as np


def iter_documents(path: str, text_field: str = "text"):
    """Yields the documents' texts of one input file (JSONL: one per non-empty line; else the whole file)."""
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--input: {path}:{i + 1} is not valid JSON ({e})") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise ValueError(f"--text-field: {path}:{i + 1} has no field {text_field!r}")
                yield str(obj[text_field])
    else:
        yield pathlib.Path(path).read_text(encoding="utf-8", errors="replace")


def _shard_name(path: str, root: str | None) -> str:
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    return rel.replace(os.sep, "__").rsplit(".", 1)[0] or "shard"


def tokenize_file(job) -> dict:
    """Tokenizes one input file into one output shard; returns counts."""
    path, out_dir, fmt, tokenizer_spec, text_field, root = job
    from gla_jax.train.tokenizer import get_tokenizer

    tok = get_tokenizer(tokenizer_spec)
    out = pathlib.Path(out_dir) / (_shard_name(path, root) + (".array_record" if fmt == "arrayrecord" else ".npy"))
    n_docs = n_tok = 0
    if fmt == "arrayrecord":
        from array_record.python.array_record_module import ArrayRecordWriter

        tmp = out.with_name(out.name + ".tmp")
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        for text in iter_documents(path, text_field):
            ids = tok.encode(text).astype(np.int32)
            writer.write(ids.tobytes())
            n_docs += 1
            n_tok += len(ids) + 1
        writer.close()
        os.replace(tmp, out)
    else:
        parts = []
        eos = np.asarray([tok.eos_id], np.int32)
        for text in iter_documents(path, text_field):
            ids = tok.encode(text).astype(np.int32)
            parts += [ids, eos]
            n_docs += 1
            n_tok += len(ids) + 1
        tmp = out.with_name(out.name + ".tmp.npy")
        np.save(tmp, np.concatenate(parts) if parts else np.zeros(0, np.int32))
        os.replace(tmp, out)
    return {"input": path, "output": str(out), "documents": n_docs, "tokens": n_tok}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="glob of input files (.jsonl/.json: one document per line)")
    p.add_argument("--tokenizer", required=True, help="'byte' or a tokenizer.json (e.g. LLaMA-2's)")
    p.add_argument("--out", required=True, type=pathlib.Path, help="output folder")
    p.add_argument("--format", choices=["arrayrecord", "npy"], default="arrayrecord")
    p.add_argument("--text-field", default="text")
    p.add_argument("--workers", type=int, default=1, help="processes (one input file each at a time)")
    p.add_argument("--num-tasks", type=int, default=1, help="split the files over this many independent tasks")
    p.add_argument("--task-id", type=int, default=None, help="this task's index (default: SLURM_ARRAY_TASK_ID or 0)")
    args = p.parse_args(argv)
    if args.task_id is None:
        args.task_id = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    if args.num_tasks < 1 or not 0 <= args.task_id < args.num_tasks:
        raise ValueError(f"--task-id: expected 0 <= task-id < num-tasks ({args.num_tasks}), got {args.task_id}")
    if args.workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {args.workers}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    files = sorted(f for f in glob.glob(os.path.expanduser(args.input), recursive=True) if os.path.isfile(f))
    if not files:
        raise ValueError(f"--input: no files match {args.input!r}")
    if args.format == "arrayrecord":
        try:
            import array_record  # noqa: F401
        except ImportError:
            raise ValueError("--format: arrayrecord needs the 'array_record' package (or use --format npy)") from None
    from gla_jax.train.tokenizer import get_tokenizer

    get_tokenizer(args.tokenizer)  # fail early on a bad tokenizer
    mine = files[args.task_id::args.num_tasks]
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]) if len(files) > 1 else None
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(os.path.abspath(f), str(args.out), args.format, args.tokenizer, args.text_field, root) for f in mine]
    t0 = time.time()
    if args.workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            stats = list(pool.imap_unordered(tokenize_file, jobs))
    else:
        stats = [tokenize_file(j) for j in jobs]
    docs, toks = sum(s["documents"] for s in stats), sum(s["tokens"] for s in stats)
    print(f"{len(stats)} shards, {docs} documents, {toks} tokens (EOS included) in {time.time() - t0:.0f}s "
          f"-> {args.out}")
    manifest = args.out / f"manifest-{args.task_id:05d}.json"
    manifest.write_text(json.dumps({"tokenizer": args.tokenizer, "format": args.format, "shards": stats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
