"""Training data with grain: documents -> tokens + EOS -> packed fixed-length rows with ``segment_ids``.

Sources (``data.source``): ``"stdlib"`` (the Python standard library's own ``.py`` files, present on every Python
install, so the default run works offline), text files / globs (a file is a document; files over 1 MiB are cut into
pieces at line ends), JSONL (one document per line, ``data.text_field``), pre-tokenized ``.npy`` (1-D token stream
split after each EOS, or 2-D rows, one document each) and ArrayRecord (each record the int32 tokens of one document;
needs ``array_record``).

The document list is ordered and split into train and held-out parts by a hash of each document's content
(``doc_keys``: the same data anywhere gives the same split and batches; text must be UTF-8), then
into ``S`` data shards (``data.num_shards``; default one per process). Each shard is its own grain pipeline: seeded
shuffle (reshuffled every epoch), repeat, tokenize (thread pool read-ahead), concat-then-split packing into rows of
``seq_len`` tokens with ``segment_ids`` (1, 2, ... per row; equal ids = same document), a seeded window shuffle of
the packed rows (``data.shuffle_window`` rows, so a batch mixes documents), batch. A process reads the
shards it owns and concatenates them, so the global batch is the same for any process count that divides ``S``.
The iterator state (per shard, JSON) is saved in checkpoints: a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gla_jax.train import doc_keys
from gla_jax.errors import UserError

PIECE_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# document sources (random access; item i -> int32 tokens of one document, EOS appended)

@dataclass(frozen=True)
class _Doc:
    kind: str      # "file" (byte range of a text file), "jsonl" (one line), "npy" (token range), "ar" (record)
    path: str
    start: int
    end: int
    name: str      # a readable name (error messages)
    key: str = ""  # content hash: the train/held-out split and the order (doc_keys)


def stdlib_files() -> tuple[Path, list[str]]:
    """The standard library's ``.py`` files (root, sorted relative paths), without site/dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in filenames:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    out.sort()
    if not out:
        raise UserError(f"data.source: found no .py files in the standard library at {root}")
    return root, out


def _text_pieces(path: str) -> list[_Doc]:
    size = os.path.getsize(path)
    if size <= PIECE_BYTES:
        return [_Doc("file", path, 0, size, path)]
    docs, start = [], 0
    with open(path, "rb") as fh:
        while start < size:
            end = min(start + PIECE_BYTES, size)
            if end < size:
                fh.seek(end)
                rest = fh.readline()
                end += len(rest)
            docs.append(_Doc("file", path, start, end, f"{path}@{start}"))
            start = end
    return docs


def _jsonl_lines(path: str) -> list[_Doc]:
    docs, off = [], 0
    with open(path, "rb") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                docs.append(_Doc("jsonl", path, off, off + len(line), f"{path}#{i}"))
            off += len(line)
    return docs


def _npy_docs(path: str, eos_id: int) -> list[_Doc]:
    arr = np.load(path, mmap_mode="r")
    if arr.ndim == 2:
        return [_Doc("npy2", path, i, i + 1, f"{path}#{i}") for i in range(arr.shape[0])]
    if arr.ndim != 1:
        raise UserError(f"data.source: {path} must be a 1-D token stream or 2-D rows, got shape {arr.shape}")
    ends = np.flatnonzero(np.asarray(arr) == eos_id) + 1
    bounds = [0, *ends.tolist()]
    if bounds[-1] != arr.shape[0]:
        bounds.append(arr.shape[0])
    return [_Doc("npy", path, a, b, f"{path}#{a}") for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _arrayrecord_docs(path: str) -> list[_Doc]:
    try:
        from array_record.python.array_record_module import ArrayRecordReader
    except ImportError as e:
        raise UserError("data.format: arrayrecord needs the 'array_record' package") from e
    reader = ArrayRecordReader(path)
    n = reader.num_records()
    reader.close()
    return [_Doc("ar", path, i, i + 1, f"{path}#{i}") for i in range(n)]


def _expand(source: str) -> list[str]:
    files = []
    for part in [p.strip() for p in source.split(",") if p.strip()]:
        hits = sorted(glob.glob(os.path.expanduser(part), recursive=True))
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise UserError(f"data.source: no files match {part!r}")
        files += hits
    return files


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.endswith((".jsonl", ".json", ".jsonl.txt")):
        return "jsonl"
    if path.endswith(".npy"):
        return "npy"
    if path.endswith((".array_record", ".arrayrecord")) or ".array_record-" in path:
        return "arrayrecord"
    return "text"


class DocumentSource:
    """Random-access documents as int32 token arrays (EOS appended). ``len`` and ``[i]`` (grain source protocol)."""

    def __init__(self, docs: list[_Doc], tokenizer, text_field: str = "text"):
        self.docs = docs
        self.tokenizer = tokenizer
        self.text_field = text_field
        self._ar_readers = {}

    def __len__(self) -> int:
        return len(self.docs)

    def _text(self, d: _Doc) -> str:
        with open(d.path, "rb") as fh:
            fh.seek(d.start)
            raw = fh.read(d.end - d.start)
        if d.kind == "file":
            return raw.decode("utf-8", errors="replace")
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"data.source: {d.name} is not valid JSON ({e})") from None
        if not isinstance(obj, dict) or self.text_field not in obj:
            raise UserError(f"data.text_field: {d.name} has no field {self.text_field!r}")
        return str(obj[self.text_field])

    def __getitem__(self, i: int) -> np.ndarray:
        d = self.docs[int(i)]
        eos = np.asarray([self.tokenizer.eos_id], np.int32)
        if d.kind in ("file", "jsonl"):
            toks = self.tokenizer.encode(self._text(d))
            return np.concatenate([toks.astype(np.int32), eos])
        if d.kind == "npy":
            return np.asarray(np.load(d.path, mmap_mode="r")[d.start:d.end], dtype=np.int32)
        if d.kind == "npy2":
            return np.concatenate([np.asarray(np.load(d.path, mmap_mode="r")[d.start], dtype=np.int32), eos])
        # arrayrecord
        from array_record.python.array_record_module import ArrayRecordReader
        r = self._ar_readers.get(d.path)
        if r is None:
            r = self._ar_readers[d.path] = ArrayRecordReader(d.path)
        raw = r.read([d.start])[0]
        return np.concatenate([np.frombuffer(raw, dtype=np.int32), eos])


def list_documents(data_cfg, tokenizer) -> tuple[DocumentSource, DocumentSource]:
    """(train, held-out) document sources for a ``DataSection``; deterministic for a given source."""
    if data_cfg.source == "stdlib":
        root, rel = stdlib_files()
        docs = [_Doc("file", str(root / r), 0, os.path.getsize(root / r), r) for r in rel]
        docs = [d for d in docs if d.end > 0]
    else:
        docs = []
        for f in _expand(data_cfg.source):
            fmt = _format_of(f, data_cfg.format)
            if fmt == "text":
                docs += _text_pieces(f)
            elif fmt == "jsonl":
                docs += _jsonl_lines(f)
            elif fmt == "npy":
                docs += _npy_docs(f, tokenizer.eos_id)
            else:
                docs += _arrayrecord_docs(f)
    # split and order by content, not by path (doc_keys); the standard library's few non-UTF-8 test files are
    # read with U+FFFD as before
    docs = [d for d in docs if d.end > d.start]
    docs = doc_keys.key_documents(docs, errors="replace" if data_cfg.source == "stdlib" else data_cfg.errors,
                                  warn=print if data_cfg.source != "stdlib" else (lambda *_: None))
    if data_cfg.max_docs:
        docs = docs[: data_cfg.max_docs]
    train, val = doc_keys.split(docs, data_cfg.val_fraction, data_cfg.source)
    return (DocumentSource(train, tokenizer, data_cfg.text_field),
            DocumentSource(val, tokenizer, data_cfg.text_field))


# ----------------------------------------------------------------------------------------------------------------
# the packed pipeline

def resolve_shards(num_shards: int, process_count: int, batch_size: int) -> int:
    s = num_shards or process_count
    if s % process_count:
        raise UserError(f"data.num_shards: {s} must be a multiple of the process count {process_count}")
    if batch_size % s:
        raise UserError(f"data.batch_size: {batch_size} must be a multiple of the number of data shards {s}")
    return s


def _shard_dataset(source: DocumentSource, shard: int, num_shards: int, rows: int, seq_len: int, *, seed: int,
                   shuffle: bool, repeat: bool, read_threads: int, prefetch: int, shuffle_window: int = 0):
    import grain
    import grain.experimental as ge

    ds = grain.MapDataset.source(source)
    n = len(source)
    if n >= num_shards:
        ds = ds[shard::num_shards]
    else:  # fewer documents than shards: every shard walks all documents in its own order
        shuffle = True
        seed = seed + 7919 * shard
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(lambda t: {"tokens": t})
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    it = ge.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len})
    if shuffle and shuffle_window > 1:
        # rows of one long document are consecutive after packing; mix them with rows of other documents
        it = ge.WindowShuffleIterDataset(it, window_size=shuffle_window, seed=seed + 104729 * (shard + 1))
    return it.batch(rows, drop_remainder=True)


class PackedBatches:
    """Iterator of this process's batches: dict ``tokens`` and ``segment_ids``, int32 ``[local_batch, seq_len]``.

    ``local_batch = batch_size * (shards owned by this process) / num_shards``. ``get_state()``/``set_state()``
    give/take ``{"shard_<s>": <grain state>}`` for the owned shards.
    """

    def __init__(self, source: DocumentSource, *, seq_len: int, batch_size: int, num_shards: int,
                 process_index: int, process_count: int, seed: int, shuffle: bool = True, repeat: bool = True,
                 read_threads: int = 2, prefetch: int = 64, shuffle_window: int = 0):
        self.num_shards = resolve_shards(num_shards, process_count, batch_size)
        per = self.num_shards // process_count
        self.shards = list(range(process_index * per, (process_index + 1) * per))
        self.rows = batch_size // self.num_shards
        self.seq_len = seq_len
        self._datasets = {s: _shard_dataset(source, s, self.num_shards, self.rows, seq_len, seed=seed,
                                            shuffle=shuffle, repeat=repeat, read_threads=read_threads,
                                            prefetch=prefetch, shuffle_window=shuffle_window)
                          for s in self.shards}
        self._iters = {s: iter(ds) for s, ds in self._datasets.items()}

    @property
    def local_batch(self) -> int:
        return self.rows * len(self.shards)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(self._iters[s]) for s in self.shards]
        return {
            "tokens": np.concatenate([p["tokens"] for p in parts]).astype(np.int32),
            "segment_ids": np.concatenate([p["tokens_segment_ids"] for p in parts]).astype(np.int32),
        }

    def get_state(self) -> dict:
        return {f"shard_{s}": self._iters[s].get_state() for s in self.shards}

    def set_state(self, state: dict) -> None:
        for s in self.shards:
            key = f"shard_{s}"
            if key not in state:
                raise UserError(f"data state: checkpoint has no state for {key} (saved with other data.num_shards?)")
            self._iters[s].set_state(_tuples(state[key]))


def _tuples(x):
    """JSON turns grain's tuples into lists; grain compares some of them with tuples, so turn them back."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    return x


def make_batches(data_cfg, source: DocumentSource, *, process_index: int = 0, process_count: int = 1,
                 seed_offset: int = 0, shuffle: bool = True, repeat: bool = True, batch_size: int | None = None,
                 seq_len: int | None = None) -> PackedBatches:
    """The packed pipeline for a ``DataSection`` over ``source`` (train: shuffled, repeated)."""
    return PackedBatches(source, seq_len=seq_len or data_cfg.seq_len, batch_size=batch_size or data_cfg.batch_size,
                         num_shards=data_cfg.num_shards, process_index=process_index, process_count=process_count,
                         seed=data_cfg.shuffle_seed + seed_offset, shuffle=shuffle, repeat=repeat,
                         read_threads=data_cfg.read_threads, prefetch=data_cfg.prefetch,
                         shuffle_window=data_cfg.shuffle_window)


def loss_mask(segment_ids: np.ndarray) -> np.ndarray:
    """float32 ``[B, T]``: 1 where position t predicts token t+1 of the same document (last column always 0)."""
    seg = np.asarray(segment_ids)
    m = np.zeros(seg.shape, np.float32)
    m[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    return m
