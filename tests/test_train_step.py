"""The library's train/eval step and loop (gla_jax.train.step, gla_jax.train.loop): the weighted loss against a
float64 numpy cross-entropy, gradient accumulation against the one-batch gradient, the update against optax's own
AdamW applied by hand, and when hooks fire."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gla_jax.train import step as S
from gla_jax.train.loop import Loop


def _toy(V=11, D=4, seed=0):
    """A bigram model: logits = E[tokens] @ W (params dict), and its apply function."""
    rng = np.random.default_rng(seed)
    params = {"E": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
              "W": jnp.asarray(rng.normal(size=(D, V)), jnp.float32)}

    def apply(p, tokens, segment_ids=None):
        return p["E"][tokens] @ p["W"]

    return apply, params


def _np_nll(params, tokens):
    logits = np.asarray(params["E"], np.float64)[tokens] @ np.asarray(params["W"], np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits, lse


def test_next_token_targets_respect_documents():
    tokens = jnp.array([[5, 6, 7, 8, 9]])
    seg = jnp.array([[1, 1, 2, 2, 0]])
    targets, weights = S.next_token_targets(tokens, seg)
    assert targets.tolist() == [[6, 7, 8, 9, 0]]
    assert weights.tolist() == [[1, 0, 1, 0, 0]]  # 6 same doc; 7 other doc; 9 padding; last position
    _, w = S.next_token_targets(tokens)
    assert w.tolist() == [[1, 1, 1, 1, 0]]


def test_weighted_loss_matches_numpy():
    apply, params = _toy()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 11, size=(3, 6)).astype(np.int32)
    targets = rng.integers(0, 11, size=(3, 6)).astype(np.int32)
    weights = (rng.random((3, 6)) < 0.5).astype(np.float32)
    weights[0, 0] = 1.0
    sums = S.loss_sums(apply, params, {"tokens": tokens, "targets": targets, "weights": weights}, accuracy=True)
    logits, lse = _np_nll(params, tokens)
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(sums["loss_sum"]), (nll * weights).sum(), rtol=1e-5)
    assert float(sums["weight"]) == weights.sum()
    assert float(sums["correct"]) == ((logits.argmax(-1) == targets) * weights).sum()


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_train_step_is_adamw_on_the_mean_loss(accum):
    """One step = optax AdamW on the gradient of the weighted mean loss (computed here with jax.grad of a numpy-like
    formula over the whole batch), whatever the number of accumulated micro-batches."""
    apply, params = _toy()
    rng = np.random.default_rng(2)
    batch = {"tokens": rng.integers(0, 11, size=(8, 5)).astype(np.int32),
             "segment_ids": np.repeat(np.array([[1, 1, 1, 2, 2]], np.int32), 8, axis=0)}
    tx = optax.adamw(1e-2)
    step = jax.jit(S.make_train_step(apply, tx, grad_accum=accum))
    new, _, metrics = step(params, tx.init(params), batch)

    tokens = jnp.asarray(batch["tokens"])
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    mask = jnp.asarray([[1, 1, 0, 1, 0]] * 8, jnp.float32)

    def mean_loss(p):
        logits = p["E"][tokens] @ p["W"]
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return (nll * mask).sum() / mask.sum()

    loss, grads = jax.value_and_grad(mean_loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    want = optax.apply_updates(params, updates)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-4)
    assert float(metrics["tokens"]) == 24.0
    for k in params:
        np.testing.assert_allclose(np.asarray(new[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6)


def test_loop_hooks_fire_every_n_at_the_end_and_on_stop():
    calls = []

    def step_fn(state, batch):
        return state + batch, {"loss": 0.0}

    def batches():
        while True:
            yield 1

    loop = Loop(step_fn)
    loop.add_hook(lambda i: calls.append(("a", i.step, i.final)), every=3)
    loop.add_hook(lambda i: calls.append(("b", i.step, i.final)), every=1)
    state, step, reason = loop.run(0, batches(), 0, 7)
    assert (state, step, reason) == (7, 7, None)
    assert [c for c in calls if c[0] == "a"] == [("a", 3, False), ("a", 6, False), ("a", 7, True)]
    assert len([c for c in calls if c[0] == "b"]) == 7

    # stop() seen after step 4: hooks that already ran at step 4 do not run twice; the others run once, final
    calls.clear()
    flag = []
    loop = Loop(step_fn)
    loop.add_hook(lambda i: calls.append(("a", i.step, i.final, i.stop)), every=3)
    loop.add_hook(lambda i: (calls.append(("b", i.step, i.final, i.stop)), i.step == 4 and flag.append("SIGTERM")))
    state, step, reason = loop.run(0, batches(), 0, 10, stop=lambda: flag[0] if flag else None)
    assert (step, reason) == (4, "SIGTERM")
    assert calls[-2:] == [("b", 4, False, None), ("a", 4, True, "SIGTERM")]
    with pytest.raises(ValueError, match="every"):
        loop.add_hook(print, every=0)


def test_profile_hook_traces_the_chosen_steps(tmp_path):
    from gla_jax.train.config import ConfigError, parse_profile
    from gla_jax.train.hooks import ProfileHook

    step_fn = jax.jit(lambda state, batch: (state + batch, {"loss": state.sum()}))
    lines = []
    loop = Loop(step_fn).add_hook(ProfileHook(tmp_path / "profile", *parse_profile("1:3"), lines.append))
    loop.run(jnp.zeros(4), iter([jnp.ones(4)] * 6), 0, 5)
    assert lines == [f"profile of steps 2..3 written to {tmp_path / 'profile'}"]
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    for bad in ("3", "3:1", "a:b"):
        with pytest.raises(ConfigError, match="^train.profile"):
            parse_profile(bad)
