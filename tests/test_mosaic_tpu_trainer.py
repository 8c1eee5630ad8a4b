"""The sharded trainer with the Mosaic TPU kernels (TPU interpret mode on 8 fake CPU devices, a 2x2x2 mesh): the
operator shard-maps the kernel over batch and heads, and the first losses agree with the pure-JAX chunk path."""

import numpy as np
import pytest

from gla_jax.ops import registry
from gla_jax.train import config as C

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.num_hidden_layers=1", "model.vocab_size=320",
        "data.seq_len=64", "data.batch_size=8", "data.max_docs=60", "train.steps=3", "train.log_every=1",
        "train.eval_every=0", "train.progress=false", "train.sample_tokens=0", "checkpoint.enabled=false",
        "optim.warmup_steps=1", "optim.lr=1e-2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


@pytest.fixture
def mosaic_tpu_interpret():
    """``impl="mosaic_tpu_interpret"``: the registered mosaic_tpu kernels in TPU interpret mode on any platform (the
    trainer's model config has no interpret switch: interpret mode is for tests). Records the local q shapes."""
    seen = []

    def load():
        kernel = registry.kernel(registry.get("mosaic_tpu"))

        def fn(q, k, v, g, **kw):
            seen.append(q.shape)
            return kernel(q, k, v, g, **{**kw, "interpret": True})

        return fn

    registry.register(registry.Backend("mosaic_tpu_interpret", load, platforms=None))
    yield seen
    registry.unregister("mosaic_tpu_interpret")


def _losses(impl, steps=3):
    """The trainer's own jitted, sharded train step (2x2x2 mesh, parameters and batch sharded, donation) for
    ``steps`` steps from the same initial state on the same batches of the run's data; the losses."""
    import tempfile

    from gla_jax.train.trainer import Trainer

    cfg = C.load_config(None, TINY + [f"model.impl={impl}"])
    with tempfile.TemporaryDirectory() as wd:
        tr = Trainer(cfg, wd, log=lambda *_: None)
        data = tr.make_data()
        state, losses = tr.init_state(), []
        for _ in range(steps):
            state, metrics = tr.train_step(state, tr.global_batch(next(data)))
            losses.append(float(metrics["loss"]))
    return np.asarray(losses)


@pytest.mark.slow  # TPU interpret mode runs every kernel op by op (~1-2 min on 2 cores)
def test_sharded_trainer_with_mosaic_tpu_matches_chunk(mosaic_tpu_interpret):
    kernel = _losses("mosaic_tpu_interpret")
    chunk = _losses("chunk")
    assert len(kernel) == 3 and np.all(np.isfinite(kernel)) and kernel[-1] < kernel[0]
    np.testing.assert_allclose(kernel, chunk, rtol=2e-5)
    # the kernel ran on local blocks: batch 8 over data x fsdp (4), heads 2 over tensor (2)
    assert mosaic_tpu_interpret and all(s[0] == 2 and s[2] == 1 for s in mosaic_tpu_interpret)
