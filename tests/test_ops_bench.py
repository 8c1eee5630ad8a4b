"""The operator benchmark's command line (gla_jax.bench_cli): flags, target bookkeeping and a tiny end-to-end run."""

import json

import pytest

from gla_jax import bench_cli


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


def test_tiny_run_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = bench_cli.main(["--T", "64", "--H", "1", "--K", "16", "--V", "16", "--reps", "1", "--impls",
                         "chunk,attention", "--no-matmul-peak", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {r["impl"]: r for r in res["rows"]}
    assert rows["chunk"]["fwd_bwd_s"] > 0 and rows["attention"]["fwd_s"] > 0
    assert set(res["targets"]) == {k for k, *_ in bench_cli.TARGETS}
    assert "targets" in capsys.readouterr().out
