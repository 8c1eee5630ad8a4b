"""Content keys for documents: the train/held-out split and the document order depend on what a document holds,
never on where its file lies, so the same data copied elsewhere (another directory, another machine) gives the same
split and the same batches for a given seed.

A document's key is the BLAKE2b-64 hash (16 hex digits) of its bytes: the raw bytes of a text piece or JSONL line,
the int32 little-endian tokens of a ``.npy`` document, the record of an ArrayRecord document. Listing reads every
document once for this (one sequential pass over the data). The same pass checks that text is UTF-8 without NUL
bytes (``data.errors="strict"``, the default, refuses other files with one line naming the file; ``"replace"``
reads invalid bytes as U+FFFD and warns once with a count). See docs/design.md §6.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict

import numpy as np

from gla_jax.errors import UserError

ERRORS = ("strict", "replace")


def content_key(raw: bytes) -> str:
    """16 hex digits: BLAKE2b with an 8-byte digest of ``raw``."""
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def held_out(key: str, fraction: float) -> bool:
    """True for the documents (by content key) that form the held-out split: about ``fraction`` of them."""
    return int(key, 16) % 100_000 < fraction * 100_000


def _check_text(doc, raw: bytes, errors: str) -> bool:
    """True if ``raw`` (a text document) is UTF-8 without NUL bytes; else UserError (strict) or False (replace)."""
    nul = raw.find(b"\x00")
    try:
        raw.decode("utf-8")
        bad = None
    except UnicodeDecodeError as e:
        bad = f"is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {doc.start + e.start})"
    if bad is None and nul >= 0:
        bad = f"looks binary (NUL byte at offset {doc.start + nul})"
    if bad is None:
        return True
    if errors == "strict":
        raise UserError(f"data.source: {doc.path} {bad}; convert it to UTF-8 or pass data.errors=replace to read "
                        "invalid bytes as U+FFFD")
    return False


def document_bytes(docs):
    """The raw bytes of every ``data._Doc``, in order (grouped by file, each file opened once)."""
    by_path = defaultdict(list)
    for i, d in enumerate(docs):
        by_path[d.path].append(i)
    out = [None] * len(docs)
    for path, idx in by_path.items():
        kind = docs[idx[0]].kind
        if kind in ("file", "jsonl"):
            with open(path, "rb") as fh:
                for i in idx:
                    d = docs[i]
                    fh.seek(d.start)
                    out[i] = fh.read(d.end - d.start)
        elif kind in ("npy", "npy2"):
            arr = np.load(path, mmap_mode="r")
            for i in idx:
                d = docs[i]
                part = arr[d.start] if kind == "npy2" else arr[d.start:d.end]
                out[i] = np.ascontiguousarray(part, dtype="<i4").tobytes()
        else:  # arrayrecord
            from array_record.python.array_record_module import ArrayRecordReader

            reader = ArrayRecordReader(path)
            try:
                for i in idx:
                    out[i] = reader.read([docs[i].start])[0]
            finally:
                reader.close()
    return out


def key_documents(docs, *, errors: str = "strict", warn=print) -> list:
    """``docs`` with their ``key`` set, ordered by key (ties keep the listing order: equal keys are equal bytes).
    Text is checked for UTF-8 (see the module docstring); with ``errors="replace"`` one warning gives the count."""
    if errors not in ERRORS:
        raise UserError(f"data.errors: expected one of {', '.join(ERRORS)}, got {errors!r}")
    raws = document_bytes(docs)
    keyed, bad_docs, bad_files = [], 0, set()
    for d, raw in zip(docs, raws):
        if d.kind in ("file", "jsonl") and not _check_text(d, raw, errors):
            bad_docs += 1
            bad_files.add(d.path)
        keyed.append(dataclasses.replace(d, key=content_key(raw)))
    if bad_docs:
        warn(f"warning: data.errors=replace: {bad_docs} document(s) in {len(bad_files)} file(s) hold bytes that "
             f"are not UTF-8 text (e.g. {sorted(bad_files)[0]}); they are read with U+FFFD in their place")
    return sorted(keyed, key=lambda d: d.key)


def split(docs, fraction: float, source: str) -> tuple[list, list]:
    """(train, held-out) by content key; UserError when there are too few documents for the requested split."""
    if not docs:
        raise UserError(f"data.source: no documents in {source!r} (are the files empty?)")
    if fraction > 0 and len(docs) < 2:
        d = docs[0]
        raise UserError(f"data.source: {source!r} holds a single document ({d.path}, {d.end - d.start} "
                        f"{'bytes' if d.kind in ('file', 'jsonl') else 'units'}): too little data to hold some out "
                        "for evaluation; add more data or set data.val_fraction=0")
    val = [d for d in docs if held_out(d.key, fraction)]
    train = [d for d in docs if not held_out(d.key, fraction)]
    if fraction > 0 and not val:
        val, train = train[-1:], train[:-1]
    if not train:
        train, val = val[:1], val[1:]
    return train, val
