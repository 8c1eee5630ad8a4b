"""experiments/bench_matmul_forms.py: each form computes the product it names (against numpy), its FLOP count
follows from the shapes, and the run writes a complete results file without writing over an earlier one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiment_loader import load_experiment


@pytest.fixture(scope="module")
def bench():
    return load_experiment("bench_matmul_forms")


def _numpy_product(name, arrays):
    a, b = arrays[:2]
    if name == "reference" or name.startswith("unbatched"):
        return [a @ b]
    if name.startswith("batched_tn"):
        return [np.swapaxes(a, 1, 2) @ b]
    if name.startswith("two_batched"):
        return [a @ b, arrays[2] @ arrays[3]]
    return [a @ b]


def test_forms_compute_what_they_name_and_count_flops(bench):
    rng = np.random.default_rng(0)
    table = bench.forms([3], smoke=True)
    assert set(table) == {"reference", "batched_3", "batched_tn_3", "unbatched_3", "two_batched_3"}
    for name, (fn, shapes, flops) in table.items():
        arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        got = fn(*arrays)
        got = list(got) if isinstance(got, tuple) else [got]
        want = _numpy_product(name, [x.astype(np.float64) for x in arrays])
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-4)
        # 2 FLOPs per multiply-add: every output element sums over the contracted length (64 or the reference N).
        contracted = shapes[0][-1] if not name.startswith("batched_tn") else shapes[0][-2]
        assert flops == sum(2 * w.size * contracted for w in want), name


def test_smoke_run_writes_every_form_and_refuses_to_overwrite(bench, tmp_path):
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench_matmul_forms_cpu.json").read_text())
    rows = {r["form"]: r for r in doc["results"]}
    assert set(rows) == set(bench.forms([2], smoke=True))
    for r in rows.values():
        assert r["kernel"] in ("ynn", "xla") and r["busy_cores"] > 0 and r["time_s"] > 0
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["time_s"])
    assert rows["reference"]["fraction_of_reference"] == pytest.approx(1.0)
    before = (tmp_path / "bench_matmul_forms_cpu.json").read_text()
    with pytest.raises(SystemExit, match="exists"):
        bench.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "bench_matmul_forms_cpu.json").read_text() == before
