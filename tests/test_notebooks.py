"""The notebooks in experiments/notebooks run top to bottom (nbclient, a fresh kernel each) at their small CI size,
and are committed without outputs."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

NB_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "notebooks"
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _fla_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "triton", "fla", "transformers"))


def test_notebooks_present_and_clean():
    assert {"quickstart.ipynb", "fla_parity.ipynb"} <= set(NOTEBOOKS)
    for name in NOTEBOOKS:
        nb = nbformat.read(NB_DIR / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name}: commit without outputs"


@pytest.mark.slow  # 36-81 s each on 2 cores; the default suite stays near 15 min (CI runs -m slow too)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    if name == "fla_parity.ipynb" and not _fla_available():
        pytest.skip("torch/fla/triton/transformers not installed")
    nb = nbformat.read(NB_DIR / name, as_version=4)
    env = {"QUICKSTART_STEPS": "60", "TRITON_INTERPRET": "1", "MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # one CPU device in the kernel (tests/conftest.py asks for 8 fake ones in this process)
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join(f for f in flags.split() if "force_host_platform_device_count" not in f)
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        os.environ["XLA_FLAGS"] = flags
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if name == "quickstart.ipynb":
        assert "max |logit difference| after restore: 0.0" in text
    if name == "fla_parity.ipynb":
        assert "argmax agreement" in text and "fla naive_recurrent_gla" in text
