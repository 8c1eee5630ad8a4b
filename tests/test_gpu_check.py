"""experiments/gpu_check.py on CPU: the --interpret path end to end (subprocess), and the target arithmetic."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "gpu_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # ~70 s of CPU: compiles the kernels and impl='chunk' in interpret mode
def test_interpret_run_writes_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, SCRIPT, "--interpret", "--out", str(tmp_path), "--T", "64"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["interpret"] is True and report["backend"] == "cpu" and report["device"]
    assert report["versions"]["jax"] and report["versions"]["numpy"]
    assert report["heavy_modules_imported"] == []  # no grain / optax / orbax in a kernel check
    # (a) both dtypes checked, every output and gradient within tolerance
    assert [e["dtype"] for e in report["correctness"]] == ["float32", "bfloat16"]
    for e in report["correctness"]:
        assert e["ok"] and e["finite"], e
        assert set(e["rel_err"]) == {"o", "final_state", "dq", "dk", "dv", "dg", "dh0"}
        assert all(e["rel_err"][n] <= e["tolerance"][n] for n in e["rel_err"])
    assert max(report["correctness"][0]["rel_err"].values()) <= 1e-4
    # (b) every jax implementation timed forward and forward+backward; cuDNN reported as skipped without a GPU
    got = {(r["impl"], r["mode"]) for r in report["timings"]}
    assert got == {(i, m) for i in ("triton", "chunk_xla") for m in ("fwd", "fwdbwd")}
    assert all(r["ms"] > 0 and r["T"] == 64 for r in report["timings"])
    assert any(s["impl"] == "cudnn_attention" for s in report["skipped"])
    # (c) targets present but not claimed at tiny T in interpret mode
    assert report["targets"] and all(t["met"] is None for t in report["targets"])
    # (d) the tiling comparison runs (two tilings in interpret mode)
    assert [r["tiling"] for r in report["tuning"]] == ["default", "num_warps=8"]
    assert all(r["ms"] > 0 and r["T"] == 64 for r in report["tuning"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert report["plot"] == "gpu_check.png" and (tmp_path / "gpu_check.png").stat().st_size > 0
    assert "correctness OK" in proc.stdout


def test_bad_budget_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        _load().main(["--out", "unused", "--tune-budget-s", "-1"])
    assert "--tune-budget-s: expected seconds >= 0" in capsys.readouterr().err


def test_target_evaluation():
    mod = _load()
    rows = [
        {"impl": "triton", "T": 4096, "mode": "fwdbwd", "ms": 9.0},
        {"impl": "cudnn_attention", "T": 4096, "mode": "fwdbwd", "ms": 1.0},  # below 8K: not a target
        {"impl": "triton", "T": 8192, "mode": "fwdbwd", "ms": 10.0},
        {"impl": "fla_chunk_gla", "T": 8192, "mode": "fwdbwd", "ms": 12.0},
        {"impl": "cudnn_attention", "T": 8192, "mode": "fwdbwd", "ms": 20.0},
        {"impl": "triton", "T": 16384, "mode": "fwdbwd", "ms": 30.0},
        {"impl": "cudnn_attention", "T": 16384, "mode": "fwdbwd", "ms": 40.0},
    ]
    res = {(t["T"], t["target"].split()[-1]): t for t in mod.evaluate_targets(rows, interpret=False)}
    assert res[(8192, "fla_chunk_gla")]["ratio"] == pytest.approx(10 / 12, abs=1e-3)
    assert res[(8192, "fla_chunk_gla")]["met"] is True
    assert res[(8192, "cudnn_attention")]["met"] is True  # 0.5 <= 0.6
    assert res[(16384, "cudnn_attention")]["met"] is False  # 0.75 > 0.6
    assert res[(16384, "fla_chunk_gla")]["met"] is None  # fla not measured
    assert all(T >= 8192 for T, _ in res)
    table = mod.table(rows)
    assert "triton" in table and "T=16384" in table
