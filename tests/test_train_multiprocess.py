"""Two processes (jax.distributed over 127.0.0.1, gloo CPU collectives, 4 fake devices each) train with the same
losses as one process with 8 devices: same global batches (2 data shards), same mesh, sharded checkpoint at the end."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from gla_jax.train import config as C
from gla_jax.train import trainer as loop
from gla_jax.train.metrics import by_step, read_metrics

REPO = Path(__file__).resolve().parent.parent
ARGS = ["model.hidden_size=32", "model.num_heads=2", "model.num_hidden_layers=1", "model.vocab_size=320",
        "data.seq_len=64", "data.batch_size=8", "data.max_docs=60", "data.num_shards=2", "train.steps=5",
        "train.log_every=1", "train.eval_every=0", "train.progress=false", "train.sample_tokens=0",
        "checkpoint.every=5", "optim.warmup_steps=2", "optim.lr=1e-2", "mesh.data=2", "mesh.fsdp=2",
        "mesh.tensor=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    wd = tmp_path / "multi"
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "gla_jax.cli", "train", "--workdir", str(wd), *ARGS,
               f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
               f"distributed.process_id={pid}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=500))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    multi = by_step(read_metrics(wd))
    assert sorted(multi) == [1, 2, 3, 4, 5]
    # the data state of each shard was written by the process that owns it
    step_dir = wd / "checkpoints" / "5" / "data"
    assert (step_dir / "shard_0.json").is_file() and (step_dir / "shard_1.json").is_file()

    cfg = C.load_config(None, ARGS + ["checkpoint.enabled=false"])
    single = loop.Trainer(cfg, tmp_path / "single", log=lambda *_: None).run()["losses"]
    np.testing.assert_allclose([multi[s] for s in range(1, 6)], [single[s] for s in range(1, 6)], rtol=1e-5)
