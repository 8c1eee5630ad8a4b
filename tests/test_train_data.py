"""grain data pipeline: sources, tokenizers, packing with segment_ids, determinism, resumable state, sharding."""

import hashlib
import json
import shutil
import sysconfig

import numpy as np
import pytest

from gla_jax.train import config as C
from gla_jax.train import data as D
from gla_jax.train.tokenizer import ByteTokenizer, get_tokenizer


def _cfg(**kw):
    items = [f"data.{k}={v}" for k, v in kw.items()]
    return C.load_config(None, items).data


def _docs(tmp_path, n=30, seed=0):
    rng = np.random.default_rng(seed)
    texts = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(rng.integers(3, 60)))) for _ in range(n)]
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i:03d}.txt").write_text(t)
    return texts


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' ✓\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.decode(np.append(ids, tok.eos_id)) == text


def test_bpe_train_and_load(tmp_path):
    pytest.importorskip("tokenizers")
    from gla_jax.train.tokenizer import train_bpe

    texts = [f"def function_{i}(x):\n    return x + {i}\n" for i in range(200)]
    tok = train_bpe(texts, 320, tmp_path / "tokenizer.json")
    again = get_tokenizer(str(tmp_path / "tokenizer.json"))
    ids = again.encode(texts[3])
    assert again.decode(ids) == texts[3]
    assert len(ids) < len(texts[3])  # merges learned
    assert again.eos_id == tok.eos_id == 0 and again.vocab_size <= 320
    with pytest.raises(ValueError, match="^data.tokenizer"):
        get_tokenizer(str(tmp_path / "missing.json"))


def test_stdlib_corpus_is_deterministic_and_split():
    root, files = D.stdlib_files()
    assert str(root) == sysconfig.get_paths()["stdlib"]
    assert files == sorted(files) and len(files) > 100
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    cfg = _cfg()
    tr, va = D.list_documents(cfg, ByteTokenizer())
    tr2, va2 = D.list_documents(cfg, ByteTokenizer())
    assert [d.name for d in tr.docs] == [d.name for d in tr2.docs] and len(va) > 0
    assert not {d.name for d in tr.docs} & {d.name for d in va.docs}
    assert abs(len(va) / (len(tr) + len(va)) - cfg.val_fraction) < 0.02
    doc = tr[0]
    assert doc[-1] == 256 and doc.dtype == np.int32
    assert ByteTokenizer().decode(doc[:-1]) == (root / tr.docs[0].name).read_text(errors="replace")


def _unpack(batches):
    """Rows -> list of segments (token arrays), in order."""
    segs = []
    for b in batches:
        for row, seg in zip(b["tokens"], b["segment_ids"]):
            for s in np.unique(seg):
                segs.append(row[seg == s])
    return segs


def test_packing_rows_and_segments(tmp_path):
    texts = _docs(tmp_path, 20)
    cfg = _cfg(source=str(tmp_path / "*.txt"), seq_len=32, batch_size=4, val_fraction=0)
    tr, _ = D.list_documents(cfg, ByteTokenizer())
    it = D.make_batches(cfg, tr, shuffle=False, repeat=False)
    batches = []
    try:
        while True:
            batches.append(next(it))
    except StopIteration:
        pass
    assert batches and all(b["tokens"].shape == (4, 32) for b in batches)
    for b in batches:
        seg = b["segment_ids"]
        assert (seg[:, 0] == 1).all() and (np.diff(seg, axis=1) >= 0).all() and (np.diff(seg, axis=1) <= 1).all()
    # concatenating the segments gives the documents (with EOS) in content-key order: nothing lost, nothing mixed
    stream = np.concatenate(_unpack(batches))
    ordered = sorted(texts, key=lambda t: hashlib.blake2b(t.encode(), digest_size=8).hexdigest())
    want = np.concatenate([np.append(np.frombuffer(t.encode(), np.uint8), 256) for t in ordered]).astype(np.int32)
    assert np.array_equal(stream, want[: len(stream)]) and len(want) - len(stream) < 4 * 32
    # each EOS ends its segment (a segment never continues across a document end)
    for s in _unpack(batches):
        assert (s[:-1] != 256).all()


def test_loss_mask_matches_definition():
    seg = np.array([[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    m = D.loss_mask(seg)
    want = np.zeros_like(m)
    for b in range(seg.shape[0]):
        for t in range(seg.shape[1] - 1):
            want[b, t] = float(seg[b, t] > 0 and seg[b, t + 1] == seg[b, t])
    assert np.array_equal(m, want)


def test_deterministic_shuffle_and_exact_resume(tmp_path):
    _docs(tmp_path, 40)
    cfg = _cfg(source=str(tmp_path / "*.txt"), seq_len=16, batch_size=4, val_fraction=0)
    tr, _ = D.list_documents(cfg, ByteTokenizer())
    a = D.make_batches(cfg, tr)
    first = [next(a) for _ in range(30)]  # more than one epoch
    b = D.make_batches(cfg, tr)
    assert all(np.array_equal(x["tokens"], next(b)["tokens"]) for x in first)
    other = D.make_batches(_cfg(source=str(tmp_path / "*.txt"), seq_len=16, batch_size=4, val_fraction=0,
                                shuffle_seed=1), tr)
    assert not all(np.array_equal(x["tokens"], next(other)["tokens"]) for x in first[:5])
    # state after k batches -> a fresh iterator continues identically
    c = D.make_batches(cfg, tr)
    for _ in range(7):
        next(c)
    state = json.loads(json.dumps(c.get_state()))  # what a checkpoint stores
    d = D.make_batches(cfg, tr)
    d.set_state(state)
    for k in range(7, 30):
        x = next(d)
        assert np.array_equal(x["tokens"], first[k]["tokens"]) and np.array_equal(x["segment_ids"],
                                                                                  first[k]["segment_ids"])


def test_process_sharding_composes_to_the_global_batch(tmp_path):
    _docs(tmp_path, 40)
    cfg = _cfg(source=str(tmp_path / "*.txt"), seq_len=16, batch_size=8, val_fraction=0, num_shards=2)
    tr, _ = D.list_documents(cfg, ByteTokenizer())
    one = D.make_batches(cfg, tr, process_index=0, process_count=1)
    p0 = D.make_batches(cfg, tr, process_index=0, process_count=2)
    p1 = D.make_batches(cfg, tr, process_index=1, process_count=2)
    assert p0.local_batch == 4 and one.local_batch == 8
    for _ in range(5):
        g = next(one)
        a, b = next(p0), next(p1)
        assert np.array_equal(g["tokens"], np.concatenate([a["tokens"], b["tokens"]]))
    # the two shards read disjoint documents
    seen0 = {tuple(s) for s in _unpack([next(p0) for _ in range(3)]) if s[-1] == 256}
    seen1 = {tuple(s) for s in _unpack([next(p1) for _ in range(3)]) if s[-1] == 256}
    assert not seen0 & seen1
    with pytest.raises(ValueError, match="^data.num_shards"):
        D.make_batches(_cfg(source=str(tmp_path / "*.txt"), num_shards=3), tr, process_index=0, process_count=2)


def test_jsonl_and_npy_sources(tmp_path):
    lines = [{"text": f"document number {i}", "id": i} for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = _cfg(source=str(tmp_path / "a.jsonl"), val_fraction=0)
    tr, _ = D.list_documents(cfg, ByteTokenizer())
    assert len(tr) == 10
    assert sorted(ByteTokenizer().decode(tr[i][:-1]) for i in range(10)) == sorted(x["text"] for x in lines)
    with pytest.raises(ValueError, match="^data.text_field"):
        D.list_documents(_cfg(source=str(tmp_path / "a.jsonl"), val_fraction=0, text_field="body"),
                         ByteTokenizer())[0][0]
    stream = np.array([5, 6, 256, 7, 256, 8, 9, 10, 256], np.int32)
    np.save(tmp_path / "t.npy", stream)
    tr, _ = D.list_documents(_cfg(source=str(tmp_path / "t.npy"), val_fraction=0), ByteTokenizer())
    assert sorted(list(tr[i]) for i in range(len(tr))) == [[5, 6, 256], [7, 256], [8, 9, 10, 256]]
    with pytest.raises(ValueError, match="^data.source"):
        D.list_documents(_cfg(source=str(tmp_path / "nothing*.txt")), ByteTokenizer())


def test_large_text_file_is_cut_at_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "PIECE_BYTES", 100)
    text = "".join(f"line {i}\n" for i in range(200))
    (tmp_path / "big.txt").write_text(text)
    tr, _ = D.list_documents(_cfg(source=str(tmp_path / "big.txt"), val_fraction=0), ByteTokenizer())
    assert len(tr) > 5
    pieces = [ByteTokenizer().decode(tr[i][:-1]) for i in range(len(tr))]
    assert "".join(sorted(pieces, key=text.index)) == text and all(p.endswith("\n") for p in pieces)


def test_arrayrecord_source(tmp_path):
    ar = pytest.importorskip("array_record.python.array_record_module")
    w = ar.ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    docs = [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32)]
    for d in docs:
        w.write(d.tobytes())
    w.close()
    tr, _ = D.list_documents(_cfg(source=str(tmp_path / "d.array_record"), val_fraction=0), ByteTokenizer())
    assert sorted(list(tr[i]) for i in range(len(tr))) == [[1, 2, 3, 256], [4, 5, 256]]


# ------------------------------------------------------------------------------------------------------------
# content-keyed split and order; inputs that are too small or not text


def _blake64(raw: bytes) -> int:
    return int(hashlib.blake2b(raw, digest_size=8).hexdigest(), 16)


def test_split_and_batches_follow_content_not_location(tmp_path):
    (tmp_path / "a").mkdir()
    texts = _docs(tmp_path / "a", 60)
    other = tmp_path / "elsewhere" / "deeper"
    other.mkdir(parents=True)
    for i, p in enumerate(sorted((tmp_path / "a").iterdir())):  # copied and renamed (other listing order)
        shutil.copy(p, other / f"{1000 - i}-{p.stem}.txt")
    runs = []
    for src in (tmp_path / "a" / "*.txt", other / "*.txt"):
        cfg = _cfg(source=str(src), seq_len=16, batch_size=4, val_fraction=0.2)
        tr, va = D.list_documents(cfg, ByteTokenizer())
        it = D.make_batches(cfg, tr)
        runs.append(([tuple(tr[i]) for i in range(len(tr))], [tuple(va[i]) for i in range(len(va))],
                     [next(it)["tokens"] for _ in range(6)]))
    (tr_a, va_a, b_a), (tr_b, va_b, b_b) = runs
    assert tr_a == tr_b and va_a == va_b and all(np.array_equal(x, y) for x, y in zip(b_a, b_b))
    # the held-out documents are those whose content hash falls under the fraction
    want_val = sorted(t for t in texts if _blake64(t.encode()) % 100_000 < 0.2 * 100_000)
    assert sorted(ByteTokenizer().decode(np.asarray(v[:-1])) for v in va_a) == want_val and want_val


def test_single_or_empty_file_says_so(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="^data.source: no documents"):
        D.list_documents(_cfg(source=str(tmp_path / "empty.txt")), ByteTokenizer())
    (tmp_path / "one.txt").write_text("hello world\n")
    with pytest.raises(ValueError, match="^data.source: .*single document.*data.val_fraction=0"):
        D.list_documents(_cfg(source=str(tmp_path / "one.txt")), ByteTokenizer())
    tr, va = D.list_documents(_cfg(source=str(tmp_path / "one.txt"), val_fraction=0), ByteTokenizer())
    assert len(tr) == 1 and len(va) == 0


def test_non_utf8_text_is_refused_or_replaced_with_a_count(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("plain text\n")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(ValueError, match="^data.source: .*latin1.txt is not UTF-8.*data.errors=replace") as e:
        D.list_documents(_cfg(source=str(tmp_path / "*.txt"), val_fraction=0), ByteTokenizer())
    assert "\n" not in str(e.value)
    (tmp_path / "latin1.txt").unlink()
    (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\x00\x00\x00binary")
    with pytest.raises(ValueError, match="blob.txt looks binary"):
        D.list_documents(_cfg(source=str(tmp_path / "*.txt"), val_fraction=0), ByteTokenizer())
    (tmp_path / "blob.txt").unlink()
    (tmp_path / "a.txt").write_bytes(b"ok \xff\xfe here\n")
    (tmp_path / "b.txt").write_bytes(b"\xe9t\xe9\n")
    tr, _ = D.list_documents(_cfg(source=str(tmp_path / "*.txt"), val_fraction=0, errors="replace"),
                             ByteTokenizer())
    out = capsys.readouterr().out
    assert "2 document(s) in 2 file(s)" in out and out.count("\n") == 1
    texts = sorted(ByteTokenizer().decode(tr[i][:-1]) for i in range(len(tr)))
    assert "ok \ufffd\ufffd here\n" in texts and "\ufffdt\ufffd\n" in texts
    with pytest.raises(ValueError, match="^data.errors"):
        _cfg(errors="ignore")
