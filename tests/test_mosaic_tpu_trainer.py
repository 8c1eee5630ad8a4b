"""The sharded trainer with the Mosaic TPU kernels: TPU interpret mode (race detection, NaN-filled uninitialised
memory) on 8 fake CPU devices, a 2x2x2 (data, fsdp, tensor) mesh, 2 scanned layers. The operator shard-maps the
kernel over batch and heads; the gradients of the first batch, two train steps' losses and gradient norms, and every
parameter after them agree with the pure-JAX chunk path.

Each side runs in its own process (tests/mosaic_tpu_trainer_run.py) with NPROC=16: without spare threads in XLA's
CPU pool the interpreter's callbacks deadlock on a machine with 8 cores or fewer (the reason is in that file and
tests/repro_cpu_callback_deadlock.py). The kernel ran on all 8 devices: the interpreter's cross-device barrier
waits for 8 participants (the shard_map's axis sizes) before each kernel, and each device's block of the batch and
heads is a different part of the outputs compared here.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


def _run(impl: str, out: Path) -> dict:
    env = dict(os.environ, NPROC="16", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(HERE / "mosaic_tpu_trainer_run.py"), impl, str(out)], cwd=HERE.parent,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        return dict(f)


@pytest.mark.slow  # interpret mode runs every kernel step as Python callbacks (6.4 min for both sides on 2 busy cores)
def test_sharded_trainer_with_mosaic_tpu_matches_chunk(tmp_path):
    kernel = _run("mosaic_tpu_interpret", tmp_path / "kernel.npz")
    chunk = _run("chunk", tmp_path / "chunk.npz")

    # the kernel ran on local blocks: batch 8 over data x fsdp (4), heads 2 over tensor (2)
    shapes = kernel["local_q_shapes"]
    assert len(shapes) and np.all(shapes[:, 0] == 2) and np.all(shapes[:, 2] == 1), shapes
    assert len(chunk["local_q_shapes"]) == 0  # the chunk path is partitioned by XLA, no shard_map

    assert np.all(np.isfinite(kernel["losses"])) and kernel["losses"][1] < kernel["losses"][0]
    np.testing.assert_allclose(kernel["losses"], chunk["losses"], rtol=1e-5)
    np.testing.assert_allclose(kernel["grad_norms"], chunk["grad_norms"], rtol=1e-4)
    names = sorted(k for k in chunk if k.startswith(("grad/", "param/")))
    assert sorted(k for k in kernel if k.startswith(("grad/", "param/"))) == names
    assert any("['attn']['gk_proj" in n for n in names), names  # the GLA layer's gate weights are compared
    # seen: gradients within 4e-7 and parameters within 2.3e-6 of each leaf's largest magnitude
    for name in names:
        ref = chunk[name]
        np.testing.assert_allclose(kernel[name], ref, rtol=1e-4, atol=2e-5 * float(np.abs(ref).max()),
                                   err_msg=name)
