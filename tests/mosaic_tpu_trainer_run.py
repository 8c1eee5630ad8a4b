"""One side of the sharded-trainer check of the Mosaic TPU kernels (tests/test_mosaic_tpu_trainer.py), run in its own
process because jax must start with 8 fake CPU devices and a larger XLA CPU thread pool:

    NPROC=16 XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tests/mosaic_tpu_trainer_run.py IMPL OUT.npz [key=value ...]

IMPL is "chunk" (the pure-JAX chunk path) or "mosaic_tpu_interpret" (the registered ``mosaic_tpu`` kernels in TPU
interpret mode with race detection and NaN-filled uninitialised memory). The trainer (2x2x2 mesh: data, fsdp,
tensor; parameters, optimizer state and batch sharded) computes, from the same initial parameters on the same
batches of its data: the gradients of the first batch's loss (its own loss function and shardings), then two of its
own jitted train steps. OUT.npz gets ``losses`` [2], ``grad_norms`` [2], ``grad/<path>`` and ``param/<path>`` (after
the two steps) float32 arrays, and ``local_q_shapes`` [n, 4] (the q shapes each kernel call saw inside
``shard_map``; empty for "chunk").

Why NPROC: TPU interpret mode runs every kernel step as a Python callback on each device's thread; each callback
copies its operands to a CPU device first (``jax.io_callback``), and that copy needs a free thread of XLA's CPU pool.
The pool has max(cores, devices) threads, so with 8 devices on a machine with 8 cores or fewer, every thread can be
blocked (7 devices in the interpreter's cross-device barrier or an XLA collective, the 8th waiting for its copy): a
deadlock. NPROC (read by XLA for its default pool size) gives the pool spare threads; nothing else changes.
Layers are scanned but not rematerialised: jax cannot partial-evaluate ``jax.checkpoint`` over the interpreter's
effectful callbacks ("Effects not supported in partial-eval of checkpoint/remat"); compiled kernels have no effects.
tests/repro_cpu_callback_deadlock.py reproduces the deadlock without Pallas.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.num_hidden_layers=2", "model.vocab_size=320",
        "data.seq_len=64", "data.batch_size=8", "data.max_docs=60", "train.steps=2",
        "train.log_every=1", "train.eval_every=0", "train.progress=false", "train.sample_tokens=0",
        "checkpoint.enabled=false", "optim.warmup_steps=1", "optim.lr=1e-2", "mesh.data=2", "mesh.fsdp=2",
        "mesh.tensor=2"]


def _register_interpret_backend(seen: list) -> None:
    """``impl="mosaic_tpu_interpret"``: the registered mosaic_tpu kernels with ``interpret=True`` on any platform
    (the trainer's model config has no interpret switch: interpret mode is for tests). Records the local q shapes."""
    from gla_jax.ops import registry

    def load():
        kernel = registry.kernel(registry.get("mosaic_tpu"))

        def fn(q, k, v, g, **kw):
            seen.append(q.shape)
            return kernel(q, k, v, g, **{**kw, "interpret": True})

        return fn

    registry.register(registry.Backend("mosaic_tpu_interpret", load, platforms=None))


def _flat(tree, prefix: str) -> dict:
    import jax

    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf, np.float32)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def main(impl: str, out: str, overrides: list[str]) -> None:
    import jax

    from gla_jax.train import config as C
    from gla_jax.train import step as step_lib
    from gla_jax.train.trainer import Trainer, mesh_context

    if len(jax.devices()) != 8:
        raise SystemExit(f"expected 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), got "
                         f"{len(jax.devices())}")
    seen: list = []
    if impl == "mosaic_tpu_interpret":
        _register_interpret_backend(seen)
    cfg = C.load_config(None, TINY + overrides + [f"model.impl={impl}"])
    with tempfile.TemporaryDirectory() as wd:
        tr = Trainer(cfg, wd, log=lambda *_: None)
        data = tr.make_data()
        batches = [tr.global_batch(next(data)) for _ in range(2)]
        params, opt_state = tr.init_state()

        def loss(p, batch):
            sums = step_lib.loss_sums(tr.apply, p, batch)
            return sums["loss_sum"] / sums["weight"]

        grad_fn = jax.jit(jax.grad(loss), in_shardings=(tr.param_shardings, tr.batch_sharding),
                          out_shardings=tr.param_shardings)
        with mesh_context(tr.mesh):
            grads = grad_fn(params, batches[0])
        result = _flat(grads, "grad/")
        state, losses, norms = (params, opt_state), [], []
        for batch in batches:
            state, metrics = tr.train_step(state, batch)
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        result |= _flat(state[0], "param/")
    np.savez(out, losses=np.asarray(losses), grad_norms=np.asarray(norms),
             local_q_shapes=np.asarray(seen, np.int64).reshape(-1, 4), **result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
