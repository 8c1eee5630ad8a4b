"""experiments/bench_chunk.py (issue 16's speed check of the chunk operator): the FLOP formula it states, the target
bookkeeping, and that it never writes over an earlier result."""

from __future__ import annotations

import pytest

from experiment_loader import load_experiment


@pytest.fixture(scope="module")
def bench():
    return load_experiment("bench_chunk")


def test_flop_formula(bench):
    # 2 * (C (K + V) + 2 K V) per token and head: B=1, T=1, H=1, K=V=64, C=64 -> 2 * (8192 + 8192)
    assert bench.chunk_flops_fwd(1, 1, 1, 64, 64, 64) == 32768
    assert bench.chunk_flops_fwd(2, 8192, 4, 64, 32, 16) == 2 * (16 * 96 + 2 * 64 * 32) * 2 * 8192 * 4


def test_targets_pass_fail_and_missing(bench):
    rows = [dict(impl="chunk", T=8192, fraction_of_matmul=0.1, bwd_over_fwd=1.5, fwd_bwd_s=1.0),
            dict(impl="chunk", T=2048, fwd_bwd_s=0.1), dict(impl="chunk", T=16384, fwd_bwd_s=2.0)]
    t = bench.compute_targets(rows)
    assert t["fraction_of_matmul_T8192"]["status"] == "FAIL"
    assert t["bwd_over_fwd_T8192"]["status"] == "PASS"
    assert t["scaling_T16384_over_T2048"]["status"] == "FAIL" and t["scaling_T16384_over_T2048"]["value"] == 20.0
    assert t["recurrent_over_chunk_T4096"]["status"].startswith("n/a")
    rows[0].update(fraction_of_matmul=0.25, bwd_over_fwd=2.5)
    rows[2]["fwd_bwd_s"] = 0.8
    rows += [dict(impl="chunk", T=4096, fwd_bwd_s=0.5), dict(impl="recurrent", T=4096, fwd_bwd_s=6.0)]
    t = bench.compute_targets(rows)
    assert [t[k]["status"] for k in ("fraction_of_matmul_T8192", "scaling_T16384_over_T2048",
                                     "recurrent_over_chunk_T4096", "bwd_over_fwd_T8192")] == ["PASS", "PASS", "PASS",
                                                                                              "FAIL"]


def test_refuses_to_overwrite(bench, tmp_path):
    (tmp_path / "bench_chunk_cpu.json").write_text("{}")
    with pytest.raises(SystemExit, match="exists"):
        bench.main(["--out", str(tmp_path), "--T", "64"])
    assert (tmp_path / "bench_chunk_cpu.json").read_text() == "{}"
