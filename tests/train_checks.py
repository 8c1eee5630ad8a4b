"""The one-step training check the model-family tests share: the trainer's loss before and after one step of the
trainer's optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def one_step_losses(model, optim_config):
    """(loss before, loss after) one step of ``gla_jax.train.optim.make_optimizer(optim_config)`` on
    ``gla_jax.train.step.loss_sums`` (mean token loss), for ``model`` on a learnable batch: ids [2, 32] int32, the
    pattern 0..7 repeated, one document per row. Both float32 scalars."""
    import optax

    from gla_jax.train import optim
    from gla_jax.train import step as step_lib

    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.asarray(np.tile(np.arange(8), (2, 4)), jnp.int32)
    tx = optim.make_optimizer(optim_config, total_steps=3)

    def loss(p):
        sums = step_lib.loss_sums(lambda q, t, s: nnx.merge(graphdef, q)(t, segment_ids=s), p,
                                  {"tokens": ids, "segment_ids": jnp.ones_like(ids)})
        return sums["loss_sum"] / sums["weight"]

    @jax.jit
    def before_and_after(p):
        before, grads = jax.value_and_grad(loss)(p)
        updates, _ = tx.update(grads, tx.init(p), p)
        return before, loss(optax.apply_updates(p, updates))

    return before_and_after(params)
