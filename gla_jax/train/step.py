"""The train step and the eval step: the one loss, gradient and update path that ``gla-jax train``, ``gla-jax eval``
and every experiment use (docs/design.md §6).

A *batch* is a dict of ``[B, T]`` arrays. ``tokens`` (int32) is always there. The loss targets are either given
(``targets`` int32 and ``weights`` float32, e.g. MQAR scores only its query positions) or derived from the tokens
for next-token prediction: position t predicts token t+1 with weight 1 when both lie in the same document (same
nonzero ``segment_ids``; without segment ids, every position but the last). The loss is the weighted mean
cross-entropy ``sum_t w_t * nll_t / sum_t w_t``, computed in float32 whatever the logits' dtype.

A model enters as ``apply(params, tokens, segment_ids) -> logits [B, T, V]`` and a parameter tree;
``split_model`` makes both from an NNX module.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Apply = Callable[..., jax.Array]


def raw_values(state):
    """An nnx.State of Variables -> the same tree holding their raw values (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def apply_fn(graphdef, rest=None) -> Apply:
    """``apply(params, tokens, segment_ids=None) -> logits`` for a model split as ``(graphdef, params, rest)``
    (``rest``: non-parameter state, None when the model has none)."""
    def apply(params, tokens, segment_ids=None):
        model = nnx.merge(graphdef, params) if rest is None else nnx.merge(graphdef, params, rest)
        return model(tokens) if segment_ids is None else model(tokens, segment_ids=segment_ids)

    return apply


def split_model(model) -> tuple[Apply, dict]:
    """(apply, params) of an NNX language model: its parameters as a tree of raw arrays, and the function that runs
    the model on them."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return apply_fn(graphdef, rest if jax.tree.leaves(rest) else None), raw_values(params)


def next_token_targets(tokens, segment_ids=None):
    """(targets [B, T] int32, weights [B, T] float32) for next-token prediction: ``targets[:, t] = tokens[:, t+1]``,
    weight 1 where token t+1 is in the same document as token t (same nonzero segment id), 0 at the last position."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    if segment_ids is None:
        same = jnp.ones(tokens[:, 1:].shape, bool)
    else:
        same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    weights = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1).astype(jnp.float32)
    return targets, weights


def batch_targets(batch: dict):
    """(targets, weights) of ``batch``: its own ``targets``/``weights`` when given, else next-token targets."""
    if "targets" in batch:
        return batch["targets"], batch["weights"].astype(jnp.float32)
    return next_token_targets(batch["tokens"], batch.get("segment_ids"))


def position_nll(logits, targets, weights):
    """Weighted negative log-likelihood per position, [B, T] float32 (0 where the weight is 0)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (jax.nn.logsumexp(logits, axis=-1) - picked) * weights


def loss_sums(apply: Apply, params, batch: dict, *, accuracy: bool = False) -> dict:
    """Float32 sums over one batch: ``loss_sum`` (weighted NLL), ``weight`` (sum of weights) and, when asked,
    ``correct`` (weighted count of positions whose argmax is the target)."""
    logits = apply(params, batch["tokens"], batch.get("segment_ids"))
    targets, weights = batch_targets(batch)
    sums = {"loss_sum": position_nll(logits, targets, weights).sum(), "weight": weights.sum()}
    if accuracy:
        sums["correct"] = ((jnp.argmax(logits, axis=-1) == targets) * weights).sum()
    return sums


def _micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...]; micro-batch i takes rows i, i+n, ... so a batch-sharded array keeps rows of every
    micro-batch on every device."""
    return {k: v.reshape(v.shape[0] // n, n, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def make_train_step(apply: Apply, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    param_shardings=None, accuracy: bool = False):
    """``train_step(params, opt_state, batch) -> (params, opt_state, metrics)``, not yet jitted (the caller jits it
    with its shardings and donation).

    The gradient is that of the weighted mean loss over the whole batch; with ``grad_accum`` > 1 it is summed over
    micro-batches in a ``lax.scan`` (rows i, i+n, ...) and divided by the total weight once, so it equals the
    one-batch gradient. ``param_shardings`` (optional) pins the gradient's layout to the parameters'.
    metrics: ``loss`` (weighted mean), ``grad_norm`` (before clipping), ``tokens`` (sum of weights), and
    ``accuracy`` when asked; float32 scalars."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum: expected >= 1, got {grad_accum}")

    def loss_fn(params, batch):
        sums = loss_sums(apply, params, batch, accuracy=accuracy)
        return sums["loss_sum"], sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def constrain(tree):
        return tree if param_shardings is None else jax.lax.with_sharding_constraint(tree, param_shardings)

    def train_step(params, opt_state, batch):
        if grad_accum == 1:
            grads, sums = grad_fn(params, batch)
        else:
            def body(carry, micro):
                g_acc, s_acc = carry
                g, s = grad_fn(params, micro)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

            zeros = constrain(jax.tree.map(jnp.zeros_like, params))
            first = jax.eval_shape(lambda: loss_sums(apply, params, batch, accuracy=accuracy))
            init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first))
            (grads, sums), _ = jax.lax.scan(body, init, _micro_batches(batch, grad_accum))
        denom = jnp.maximum(sums["weight"], 1.0)
        grads = constrain(jax.tree.map(lambda g: g / denom, grads))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": sums["loss_sum"] / denom, "grad_norm": optax.global_norm(grads), "tokens": sums["weight"]}
        if accuracy:
            metrics["accuracy"] = sums["correct"] / denom
        return params, opt_state, metrics

    return train_step


def make_eval_step(apply: Apply, *, accuracy: bool = False):
    """``eval_step(params, batch) -> sums`` (see ``loss_sums``), not yet jitted; add sums over batches, then divide
    ``loss_sum`` by ``weight``."""
    def eval_step(params, batch):
        return loss_sums(apply, params, batch, accuracy=accuracy)

    return eval_step
