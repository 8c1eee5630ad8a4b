"""Parity with the PyTorch library fla: operator outputs, model logits of fla checkpoints loaded with load_fla, and
fla loading what save_fla writes.

The torch side runs in a subprocess (tests/fla_harness.py) with Triton's interpreter; these tests are skipped only
when torch/fla/triton/transformers are not installed. The reference folder is built once per test session and shared
between pytest-xdist workers (file lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fla_harness import OP_CASES, PARITY_CONFIGS, fla_available, run_harness

pytestmark = pytest.mark.skipif(not fla_available(), reason="torch/fla/triton/transformers not installed")


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| over all elements, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _shared_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def fla_refs(tmp_path_factory) -> Path:
    """Folder made by ``fla_harness.py make`` (fla checkpoints, tokens, logits, op references), built once."""
    root = _shared_root(tmp_path_factory)
    out = root / "fla_refs"
    with open(root / "fla_refs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "done.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                run_harness("make", str(out))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def _available_impls():
    impls = ["recurrent"]
    try:
        import gla_jax.ops.chunk  # noqa: F401
        impls.append("chunk")
    except ImportError:
        pass
    return impls


# ------------------------------------------------------------------------------------------------ operator level


@pytest.mark.parametrize("case", list(OP_CASES))
@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_gla_matches_fla_naive_recurrent(fla_refs, case, impl):
    if impl not in _available_impls():
        pytest.skip(f"impl={impl!r} not implemented yet")
    from gla_jax.ops import gla

    ref = np.load(fla_refs / f"op_{case}.npz")
    q, k, v, g = (jnp.asarray(ref[n]) for n in "qkvg")
    o, s = gla(q, k, v, g, output_final_state=True, impl=impl)
    assert o.dtype == jnp.float32 and o.shape == ref["o"].shape
    assert rel_err(o, ref["o"]) <= 1e-5
    assert rel_err(s, ref["s"]) <= 1e-5
    o, s = gla(q, k, v, g, initial_state=jnp.asarray(ref["h0"]), output_final_state=True, impl=impl)
    assert rel_err(o, ref["o_h0"]) <= 1e-5
    assert rel_err(s, ref["s_h0"]) <= 1e-5
