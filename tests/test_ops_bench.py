"""The operator benchmark (experiments/bench_ops.py, run by `gla-jax bench`): flags, target bookkeeping, where results
go (never over an earlier file unless --replace), and a tiny end-to-end run through the CLI."""

import datetime
import json

import pytest

from gla_jax.cli.bench import load_benchmark

bench_cli = load_benchmark()


def test_quick_defaults_and_bad_flags():
    a = bench_cli.parse_args(["--quick"])
    assert a.T == list(bench_cli.QUICK_T) and a.reps <= 2 and a.parallel_max_T == 256
    a = bench_cli.parse_args([])
    assert a.T == list(bench_cli.DEFAULT_T) and a.impls == list(bench_cli.IMPLS)
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--impls", "chunk,flash"])


def test_targets_pass_fail_and_missing():
    rows = [dict(impl="chunk", T=8192, fwd_bwd_s=1.0), dict(impl="attention", T=8192, fwd_bwd_s=10.0),
            dict(impl="chunk", T=2048, fwd_bwd_s=0.1), dict(impl="chunk", T=16384, fwd_bwd_s=2.0)]
    t = bench_cli.compute_targets(rows)
    assert t["chunk_vs_attention_T8192"]["status"] == "FAIL"  # 0.1 > 0.05
    assert t["chunk_scaling_T16384_over_T2048"]["status"] == "FAIL"  # 20 > 10
    assert t["recurrent_over_chunk_T4096"]["status"].startswith("n/a")
    rows[1]["fwd_bwd_s"] = 40.0
    rows[3]["fwd_bwd_s"] = 0.5
    t = bench_cli.compute_targets(rows)
    assert t["chunk_vs_attention_T8192"]["status"] == "PASS"
    assert t["chunk_scaling_T16384_over_T2048"]["status"] == "PASS"


def test_results_never_overwrite_an_earlier_file(tmp_path, monkeypatch):
    """--quick writes its own file; an existing default file gets a timestamped sibling; --replace and --out say
    otherwise explicitly, and an existing --out is refused."""
    monkeypatch.setattr(bench_cli, "RESULTS", tmp_path)
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    quick = bench_cli.parse_args(["--quick"])
    assert bench_cli.output_path(quick, "cpu", now) == tmp_path / "bench_ops_cpu_quick.json"
    full = bench_cli.parse_args([])
    assert bench_cli.output_path(full, "cpu", now) == tmp_path / "bench_ops_cpu.json"
    (tmp_path / "bench_ops_cpu.json").write_text("{}")
    (tmp_path / "bench_ops_cpu_quick.json").write_text("{}")
    assert bench_cli.output_path(full, "cpu", now) == tmp_path / "bench_ops_cpu_20260102T030405Z.json"
    assert bench_cli.output_path(quick, "cpu", now) == tmp_path / "bench_ops_cpu_quick_20260102T030405Z.json"
    assert bench_cli.output_path(bench_cli.parse_args(["--replace"]), "cpu", now) == tmp_path / "bench_ops_cpu.json"
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--out", str(tmp_path / "bench_ops_cpu.json")])
    args = bench_cli.parse_args(["--out", str(tmp_path / "bench_ops_cpu.json"), "--replace"])
    assert bench_cli.output_path(args, "cpu", now) == tmp_path / "bench_ops_cpu.json"


def test_tiny_run_writes_json(tmp_path, capsys):
    from gla_jax.cli import main as gla_main

    out = tmp_path / "b.json"
    rc = gla_main(["bench", "--T", "64", "--H", "1", "--K", "16", "--V", "16", "--reps", "1", "--impls",
                         "chunk,attention", "--no-matmul-peak", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {r["impl"]: r for r in res["rows"]}
    assert rows["chunk"]["fwd_bwd_s"] > 0 and rows["attention"]["fwd_s"] > 0
    assert set(res["targets"]) == {k for k, *_ in bench_cli.TARGETS}
    assert "targets" in capsys.readouterr().out
