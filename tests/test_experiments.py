"""The experiment scripts: the MQAR generator's layout, the numerics report's float64 reference (checked against
tests/reference.py), the results writer, and each script's --smoke path (seconds) with the JSON fields it promises.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import sys

import numpy as np
import pytest

from experiment_loader import load_experiment as _load  # puts experiments/ on sys.path

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common():
    return _load("common")


@pytest.fixture(scope="module")
def mqar():
    return _load("mqar")


@pytest.fixture(scope="module")
def numerics():
    return _load("numerics")


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001
        return False
    return True


HAS_MODELS = _has("gla_jax.models") and hasattr(importlib.import_module("gla_jax.models"), "GLAForCausalLM")
HAS_CHUNK = _has("gla_jax.ops.chunk")

# ----------------------------------------------------------------------------------------------------------------
# MQAR data


@pytest.mark.parametrize("seq_len,n,vocab", [(32, 4, 64), (128, 16, 256), (256, 64, 8192), (64, 16, 40)])
def test_mqar_layout(mqar, seq_len, n, vocab):
    x, y, m = mqar.mqar_batch(np.random.default_rng(seq_len + n), 64, seq_len, n, vocab)
    assert x.shape == y.shape == m.shape == (64, seq_len)
    assert x.dtype == np.int32 and y.dtype == np.int32 and m.dtype == bool
    half = vocab // 2
    assert (x >= 0).all() and (x < vocab).all()
    for b in range(64):
        keys, vals = x[b, 0:2 * n:2], x[b, 1:2 * n:2]
        assert len(set(keys.tolist())) == n and len(set(vals.tolist())) == n, "keys/values must be distinct"
        assert ((keys >= 1) & (keys < half)).all() and ((vals >= half) & (vals < vocab)).all()
        table = dict(zip(keys.tolist(), vals.tolist()))
        qpos = np.flatnonzero(m[b])
        assert len(qpos) == n, "one query per key"
        assert (qpos >= 2 * n).all() and ((qpos - 2 * n) % 2 == 0).all(), "queries after the context, even offsets"
        assert sorted(x[b, qpos].tolist()) == sorted(keys.tolist()), "every key is queried exactly once"
        for t in qpos:
            assert y[b, t] == table[int(x[b, t])], "the target of a query is its key's value"
        assert (y[b][~m[b]] == 0).all()


def test_mqar_queries_favour_short_gaps(mqar):
    # power_a = 0.01: P(gap i) ~ i^-0.99, so the first query slot is chosen far more often than the last.
    _, _, m = mqar.mqar_batch(np.random.default_rng(0), 2000, 256, 16, 8192)
    counts = m[:, 32::2].sum(0)
    assert counts[0] > 5 * counts[-1]
    assert counts[:10].sum() > counts[-10:].sum() * 3


def test_mqar_deterministic_and_bad_args(mqar):
    a = mqar.mqar_batch(np.random.default_rng(3), 4, 32, 4, 64)
    b = mqar.mqar_batch(np.random.default_rng(3), 4, 32, 4, 64)
    for u, w in zip(a, b):
        np.testing.assert_array_equal(u, w)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        mqar.mqar_batch(rng, 4, 32, 9, 64)
    with pytest.raises(ValueError, match="seq_len"):
        mqar.mqar_batch(rng, 4, 33, 4, 64)
    with pytest.raises(ValueError, match="vocab_size"):
        mqar.mqar_batch(rng, 4, 32, 4, 8)
    with pytest.raises(ValueError, match="batch"):
        mqar.mqar_batch(rng, 0, 32, 4, 64)


# ----------------------------------------------------------------------------------------------------------------
# Numerics: the float64 reference with a hand-written backward, against tests/reference.py (jax autodiff, x64).


@pytest.mark.parametrize("regime", ["layer", "extreme"])
def test_numerics_reference_matches_independent_float64(numerics, regime):
    sys.path.insert(0, str(ROOT / "tests"))
    from reference import reference_gla

    rng = np.random.default_rng(1)
    B, T, H, K, V = 2, 70, 2, 8, 5  # T not a multiple of the checkpoint block
    q, k = rng.standard_normal((B, T, H, K)), rng.standard_normal((B, T, H, K))
    v, do = rng.standard_normal((B, T, H, V)), rng.standard_normal((B, T, H, V))
    g = numerics.make_gates(rng, regime, (B, T, H, K))
    assert (g <= 0).all()
    o, grads = numerics.recurrence_f64(q, k, v, g, 0.3, do=do, block=16)
    o_ref, _, grads_ref = reference_gla(q, k, v, g, scale=0.3, do=do)
    np.testing.assert_allclose(o, o_ref, rtol=1e-10, atol=1e-10)
    for x, r in zip(grads, grads_ref[:4]):
        np.testing.assert_allclose(x, r, rtol=1e-9, atol=1e-9)
    assert numerics.rel_rms(o * (1 + 1e-3), o) == pytest.approx(1e-3, rel=1e-6)
    assert numerics.rel_rms(np.full_like(o, np.nan), o) == float("inf")


def test_numerics_smoke(numerics, tmp_path):
    impls = ["recurrent"] + (["chunk"] if HAS_CHUNK else [])
    numerics.main(["--smoke", "--out", str(tmp_path), "--impls", *impls])
    doc = json.loads((tmp_path / "numerics_smoke.json").read_text())
    _check_doc(doc, "numerics_smoke")
    assert (tmp_path / "numerics_smoke.png").stat().st_size > 1000
    rows = doc["results"]
    assert {r["impl"] for r in rows} == set(impls)
    for r in rows:
        assert {"T", "gate", "dtype", "o_err", "o_floor", "dq_err", "dk_err", "dv_err", "dg_err"} <= set(r)
        bound = 1e-5 if r["dtype"] == "float32" else 2e-2
        assert r["finite"] and r["o_err"] < bound and r["dg_err"] < bound, r


@pytest.mark.slow  # ~30 s of Triton compiles
def test_kernel_resources_smoke(tmp_path):
    pytest.importorskip("triton")
    kr = _load("kernel_resources")
    assert kr.main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "kernel_resources_smoke.json").read_text())
    _check_doc(doc, "kernel_resources_smoke")
    rows = doc["results"]
    # 7 kernels with and without packed documents, each compiled for sm_90
    assert len(rows) == 14 and {r["segments"] for r in rows} == {False, True}
    for r in rows:
        assert r["fits"] and 0 < r["shared_kib"] <= 227 and 0 < r["registers"] <= 255 and r["ptx_lines"] > 100


# ----------------------------------------------------------------------------------------------------------------
# The training experiments' --smoke paths (a few steps of tiny models; they check the pipeline and the JSON fields)

needs_models = pytest.mark.skipif(not (HAS_MODELS and HAS_CHUNK), reason="models / chunk op not available")


@pytest.mark.slow  # about a minute of training on 2 cores
@needs_models
def test_mqar_smoke(tmp_path):
    mqar = _load("mqar")
    mqar.main(["--smoke", "--out", str(tmp_path), "--models", "gla", "transformer"])
    doc = json.loads((tmp_path / "mqar_smoke.json").read_text())
    _check_doc(doc, "mqar_smoke")
    rows = doc["results"]
    assert [r["model"] for r in rows] == ["gla", "transformer"]
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["params"] > 0 and np.isfinite(r["final_train_loss"])
        assert r["seq_len"] == 32 and r["num_kv_pairs"] == 4
    assert (tmp_path / "mqar_smoke.png").stat().st_size > 1000


def test_mqar_extend_joins_runs_of_the_same_settings(mqar, common, tmp_path):
    """--extend keeps the earlier file's rows that the new run does not redo, and refuses other settings."""
    row = lambda model, width, acc: {"model": model, "width": width, "seq_len": 32, "num_kv_pairs": 4, "test_acc": acc}
    config = {k: 1 for k in mqar.SHARED_CONFIG}
    path = common.write_results("m", config=config, seed=1, results=[row("gla", 32, 0.1), row("gla", 64, 0.2)],
                                out_dir=tmp_path)
    rows, extra = mqar.extend_rows(path, config, [row("gla", 64, 0.9), row("gla", 128, 0.95)])
    assert [(r["width"], r["test_acc"]) for r in rows] == [(32, 0.1), (64, 0.9), (128, 0.95)]
    assert extra["extends"][0]["rows"] == 1
    assert mqar.extend_rows(tmp_path / "absent.json", config, rows[:1]) == (rows[:1], None)
    with pytest.raises(ValueError, match="^--lr: "):
        mqar.extend_rows(path, {**config, "lr": 2}, rows)


@pytest.mark.slow  # about a minute of training on 2 cores
@needs_models
def test_gate_ablation_smoke(tmp_path):
    gate = _load("gate_ablation")
    gate.main(["--smoke", "--out", str(tmp_path), "--variants", "gla", "fixed"])
    doc = json.loads((tmp_path / "gate_ablation_smoke.json").read_text())
    _check_doc(doc, "gate_ablation_smoke")
    rows = {r["variant"]: r for r in doc["results"]}
    assert set(rows) == {"gla", "fixed"}
    for r in rows.values():
        # 3 steps from a random init: perplexity near the vocabulary size, finite and > 1
        assert 1.0 < r["train_ppl"] < 1000 and 1.0 < r["val_ppl"] < 1000
        assert r["train_ppl"] == pytest.approx(np.exp(r["train_loss"]))
    assert rows["fixed"]["params"] < rows["gla"]["params"], "the fixed decay has no gate parameters"
    assert set(doc["curves"]) == {"gla", "fixed"} and doc["held_out_order_4_heads"]


@pytest.mark.slow  # about a minute of training on 2 cores
@needs_models
def test_length_extrapolation_smoke(tmp_path):
    lenx = _load("length_extrapolation")
    lenx.main(["--smoke", "--out", str(tmp_path), "--models", "gla"])
    doc = json.loads((tmp_path / "length_extrapolation_smoke.json").read_text())
    _check_doc(doc, "length_extrapolation_smoke")
    buckets = [r for r in doc["results"] if not r.get("summary")]
    assert buckets[0]["bucket_start"] == 0 and buckets[-1]["bucket_end"] == 32 * 4
    assert any(r["beyond_train_len"] for r in buckets)
    assert all(r["bucket_end"] == s["bucket_start"] for r, s in zip(buckets, buckets[1:])), "contiguous buckets"
    assert all(r["ppl"] is None or r["ppl"] > 1 for r in buckets)
    (summary,) = [r for r in doc["results"] if r.get("summary")]
    assert summary["params"] > 0 and summary["eval_tokens"] > 0


@pytest.mark.slow  # about a minute of training on 2 cores
@needs_models
def test_throughput_smoke(tmp_path):
    tp = _load("throughput")
    tp.main(["--smoke", "--out", str(tmp_path), "--lengths", "64"])
    doc = json.loads((tmp_path / "throughput_smoke.json").read_text())
    _check_doc(doc, "throughput_smoke")
    rows = {r["model"]: r for r in doc["results"]}
    assert set(rows) == {"gla", "transformer"}
    for r in rows.values():
        assert r["tokens_per_sec"] > 0 and r["step_seconds"] > 0 and r["tokens_per_step"] == 256
    p = [r["params"] for r in rows.values()]
    assert abs(p[0] - p[1]) / max(p) < 0.1, "equal parameter counts (within the gate's low-rank projection)"


def test_bench_compile_never_overwrites_results(tmp_path):
    bc = _load("bench_compile")
    (tmp_path / "compile_time.json").write_text("{}")
    with pytest.raises(SystemExit, match="--replace"):
        bc.main(["--out", str(tmp_path)])
    assert (tmp_path / "compile_time.json").read_text() == "{}"


@pytest.mark.slow
@needs_models
def test_bench_compile_smoke(tmp_path):
    """Scanned layers: the lowered train step has the same size at 1 and 2 layers; the Python loop's grows."""
    bc = _load("bench_compile")
    bc.main(["--smoke", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "compile_time_smoke.json").read_text())
    _check_doc(doc, "compile_time_smoke")
    lines = {(r["layer_mode"], r["layers"]): r["program_lines"] for r in doc["results"]}
    assert lines[("scan", 1)] == lines[("scan", 2)] and lines[("loop", 2)] > lines[("loop", 1)]
    assert all(r["compile_s"] > 0 for r in doc["results"])


# ----------------------------------------------------------------------------------------------------------------
# Data preparation: what prepare_data.py writes, the library's pipeline reads back as the same documents.


@pytest.mark.parametrize("fmt", ["npy", "arrayrecord"])
def test_prepare_data_round_trip(tmp_path, fmt):
    if fmt == "arrayrecord" and not _has("array_record"):
        pytest.skip("array_record not installed")
    prep = _load("prepare_data")
    texts = {"a.jsonl": ["def f(x):\n    return x\n", "héllo wörld", "x" * 300],
             "sub/b.jsonl": ["import os\n", "print('ok')"]}
    for name, docs in texts.items():
        (tmp_path / "raw" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "raw" / name).write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n\n")
    out = tmp_path / "tok"
    assert prep.main(["--input", str(tmp_path / "raw" / "**" / "*.jsonl"), "--tokenizer", "byte", "--out", str(out),
                      "--format", fmt]) == 0
    from gla_jax.train.config import DataSection
    from gla_jax.train.data import list_documents
    from gla_jax.train.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ext = "array_record" if fmt == "arrayrecord" else "npy"
    train, val = list_documents(DataSection(source=str(out / f"*.{ext}"), val_fraction=0.0), tok)
    got = sorted(tok.decode(train[i][:-1]) for i in range(len(train)))
    assert all(int(train[i][-1]) == tok.eos_id for i in range(len(train)))
    assert got == sorted(t for docs in texts.values() for t in docs)
    manifest = json.loads((out / "manifest-00000.json").read_text())
    assert sum(s["documents"] for s in manifest["shards"]) == 5
    with pytest.raises(ValueError, match="--input"):
        prep.main(["--input", str(tmp_path / "nothing*.jsonl"), "--tokenizer", "byte", "--out", str(out)])
    with pytest.raises(ValueError, match="--task-id"):
        prep.main(["--input", "x", "--tokenizer", "byte", "--out", str(out), "--num-tasks", "2", "--task-id", "2"])


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers


def _check_doc(doc, name):
    assert doc["experiment"] == name
    assert isinstance(doc["config"], dict) and isinstance(doc["seed"], int)
    env = doc["env"]
    assert env["packages"]["jax"] and env["packages"]["numpy"]
    assert env["device"]["backend"] in ("cpu", "gpu", "tpu") and env["device"]["device_count"] >= 1
    assert env["python"] and doc["started"] <= doc["finished"]
    assert isinstance(doc["results"], list) and doc["results"]


def test_write_results_and_table(common, tmp_path):
    inside = common.REPO_ROOT.resolve() / "experiments" / "results"
    path = common.write_results("demo", config={"a": 1, "p": pathlib.Path("x"), "out": str(inside),
                                                "elsewhere": str(tmp_path)}, seed=7,
                                results=[{"x": np.float32(1.5), "y": float("nan"), "z": np.arange(2)}],
                                out_dir=tmp_path)
    doc = json.loads(path.read_text())
    _check_doc(doc, "demo")
    assert doc["results"] == [{"x": 1.5, "y": None, "z": [0, 1]}] and doc["config"]["p"] == "x"
    # Paths inside the repository are stored relative to it (results name no machine); others stay as given.
    assert doc["config"]["out"] == "experiments/results" and doc["config"]["elsewhere"] == str(tmp_path)
    with pytest.raises(ValueError, match="name"):
        common.write_results("a/b", config={}, seed=0, results=[], out_dir=tmp_path)
    # an existing results file is never overwritten by accident: write_results refuses, and so does an experiment
    # before it starts (refuse_overwrite), unless asked
    before = path.read_text()
    with pytest.raises(FileExistsError):
        common.write_results("demo", config={}, seed=0, results=[], out_dir=tmp_path)
    with pytest.raises(SystemExit, match="--replace"):
        common.refuse_overwrite(tmp_path, "demo", replace=False)
    assert path.read_text() == before
    common.refuse_overwrite(tmp_path, "demo", replace=True)
    common.refuse_overwrite(tmp_path, "other", replace=False)
    table = common.format_table([{"a": 1, "b": 0.5}, {"a": 22, "b": None}])
    lines = table.splitlines()
    assert len(lines) == 4 and "22" in lines[3] and "0.5" in lines[2]


@pytest.mark.parametrize("name", ["bench_scalar_gate", "bench_selective_scan"])
def test_baseline_benchmarks_never_overwrite_results(name, tmp_path):
    """The shared --replace/refuse_overwrite: an existing results file stops the run before any timing."""
    import jax

    bench = _load(name)
    (tmp_path / f"{name}_{jax.default_backend()}.json").write_text("{}")
    with pytest.raises(SystemExit, match="--replace"):
        bench.main(["--out", str(tmp_path)])
    assert (tmp_path / f"{name}_{jax.default_backend()}.json").read_text() == "{}"


def test_compare_models_shapes_match_parameter_counts():
    """At the default width the five families' parameter counts are within 10% of GLA's (the matching knobs:
    RetNet's MLP width, Mamba2's state size; Mamba and Mamba2 twice as deep)."""
    cmp = _load("compare_models")
    counts = {}
    for kind in cmp.FAMILIES:
        arch, fields = cmp.family_fields(kind, width=64, layers=2, heads=4, vocab=320, train_len=128)
        counts[kind] = cmp.count_params(arch, fields)
        if kind in ("mamba", "mamba2"):
            assert fields["num_hidden_layers"] == 4
    assert all(abs(n / counts["gla"] - 1) < 0.10 for n in counts.values()), counts
    with pytest.raises(ValueError, match="^kind: "):
        cmp.family_fields("rwkv", width=64, layers=2, heads=4, vocab=320, train_len=128)


def test_compare_models_reuses_gate_ablation_rows_only_for_the_same_settings(common, tmp_path):
    cmp = _load("compare_models")
    args = cmp.parse_args([])
    config = {k: getattr(args, k) for k in cmp.GATE_ABLATION_SHARED if k != "heads"} | {"seq_len": args.train_len}
    rows = [{"variant": v, "gate": v, "heads": 4, "params": 1, "train_ppl": 2.0, "val_ppl": 3.0,
             "paper_train_ppl": 4.0} for v in ("gla", "none")] + [
        {"variant": "gla-8heads", "gate": "gla", "heads": 8, "params": 1, "train_ppl": 2.0, "val_ppl": 3.0,
         "paper_train_ppl": 4.0}]
    path = common.write_results("gate_ablation", config=config, seed=0, results=rows, out_dir=tmp_path)
    got = cmp.gate_ablation_rows(args, path)
    assert [r["variant"] for r in got["rows"]] == ["gla", "none"]
    (nogate,) = [a for a in cmp.ablation_table([], got) if a["row"].startswith("no gate")]
    assert nogate["val_ppl"] == 3.0
    assert cmp.gate_ablation_rows(cmp.parse_args(["--steps", "7"]), path) is None
    assert cmp.gate_ablation_rows(args, path, gla_row={"val_ppl": 3.01}) == got  # this run's GLA agrees
    assert cmp.gate_ablation_rows(args, path, gla_row={"val_ppl": 4.0}) is None, "older code: not reused"
    assert cmp.gate_ablation_rows(args, tmp_path / "absent.json") is None


@pytest.mark.slow  # 35 s: the other experiment smoke tests are slow too
@needs_models
def test_compare_models_smoke(tmp_path):
    cmp = _load("compare_models")
    cmp.main(["--smoke", "--out", str(tmp_path), "--models", "mamba2"])
    doc = json.loads((tmp_path / "compare_models_smoke.json").read_text())
    _check_doc(doc, "compare_models_smoke")
    assert doc["complete"] is True and doc["held_out_order"] == ["mamba2"]
    (row,) = doc["results"]
    assert row["model"] == "mamba2" and row["params"] > 0 and row["mqar_params"] > 0
    # 3 steps from a random init: perplexity near the vocabulary size, finite and > 1
    assert 1.0 < row["train_ppl"] < 1000 and 1.0 < row["val_ppl"] < 1000
    assert row["val_ppl"] == pytest.approx(np.exp(row["val_loss"]))
    assert 0.0 <= row["mqar_test_acc"] <= 1.0 and np.isfinite(row["mqar_final_train_loss"])
    buckets = row["buckets"]
    assert buckets[0]["start"] == 0 and buckets[-1]["end"] == 32 * 4
    assert all(a["end"] == b["start"] for a, b in zip(buckets, buckets[1:])), "contiguous buckets"
    assert [r["run"] for r in doc["ablation"]] == ["Mamba2"]
    assert doc["config"]["tokens_per_family"] == 3 * 2 * 32
    assert (tmp_path / "compare_models_smoke.png").stat().st_size > 1000
    assert doc["gla_gate_variants"] is None, "gate_ablation.json was run with other settings than the smoke"
    table = _load("summarize").compare_models(doc)
    assert "| Mamba2 " in table and "0-32" in table and "data-dependent scalar gate" in table
    with pytest.raises(SystemExit, match="--name"):  # a finished result is never overwritten by accident
        cmp.main(["--out", str(tmp_path), "--name", "compare_models_smoke", "--models", "mamba2"])
