"""grain data pipeline: sources, tokenizers, packing with segment_ids, determinism, resumable state, sharding."""

import json
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
    # concatenating the segments gives the documents (with EOS) in order: nothing lost, nothing mixed
    stream = np.concatenate(_unpack(batches))
    want = np.concatenate([np.append(np.frombuffer(t.encode(), np.uint8), 256) for t in texts]).astype(np.int32)
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
    assert ByteTokenizer().decode(tr[4][:-1]) == "document number 4"
    with pytest.raises(ValueError, match="^data.text_field"):
        D.list_documents(_cfg(source=str(tmp_path / "a.jsonl"), val_fraction=0, text_field="body"),
                         ByteTokenizer())[0][0]
    stream = np.array([5, 6, 256, 7, 256, 8, 9, 10, 256], np.int32)
    np.save(tmp_path / "t.npy", stream)
    tr, _ = D.list_documents(_cfg(source=str(tmp_path / "t.npy"), val_fraction=0), ByteTokenizer())
    assert [list(tr[i]) for i in range(len(tr))] == [[5, 6, 256], [7, 256], [8, 9, 10, 256]]
    with pytest.raises(ValueError, match="^data.source"):
        D.list_documents(_cfg(source=str(tmp_path / "nothing*.txt")), ByteTokenizer())


def test_large_text_file_is_cut_at_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "PIECE_BYTES", 100)
    text = "".join(f"line {i}\n" for i in range(200))
    (tmp_path / "big.txt").write_text(text)
    tr, _ = D.list_documents(_cfg(source=str(tmp_path / "big.txt"), val_fraction=0), ByteTokenizer())
    assert len(tr) > 5
    pieces = [ByteTokenizer().decode(tr[i][:-1]) for i in range(len(tr))]
    assert "".join(pieces) == text and all(p.endswith("\n") for p in pieces)


def test_arrayrecord_source(tmp_path):
    ar = pytest.importorskip("array_record.python.array_record_module")
    w = ar.ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    docs = [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32)]
    for d in docs:
        w.write(d.tobytes())
    w.close()
    tr, _ = D.list_documents(_cfg(source=str(tmp_path / "d.array_record"), val_fraction=0), ByteTokenizer())
    assert [list(tr[i]) for i in range(len(tr))] == [[1, 2, 3, 256], [4, 5, 256]]
