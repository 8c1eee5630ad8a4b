"""The optimizer: AdamW (β 0.9/0.95) with linear warmup then cosine decay to ``min_lr_ratio`` of the peak,
global-norm clipping, and weight decay only on matrices (not on norms' scales, biases, or the gate's bias)."""

from __future__ import annotations

import jax
import optax

_NO_DECAY_WORDS = ("norm", "bias", "scale")


def learning_rate_schedule(optim_cfg, total_steps: int):
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine to ``lr * min_lr_ratio`` at
    ``total_steps``; constant after."""
    peak = optim_cfg.lr
    warm = min(optim_cfg.warmup_steps, max(total_steps, 1))
    decay = max(total_steps - warm, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=max(warm, 0), decay_steps=warm + decay,
        end_value=peak * optim_cfg.min_lr_ratio)


def _path_names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return out


def decay_mask(params):
    """True for parameters that get weight decay: arrays with ndim >= 2 whose path names no norm or bias
    (embeddings and projection matrices); False for norm scales, biases (incl. the gate's low-rank bias), scalars."""
    def one(path, x):
        names = [n.lower() for n in _path_names(path)]
        if any(w in n for n in names for w in _NO_DECAY_WORDS):
            return False
        return getattr(x, "ndim", 0) >= 2

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule, masked weight decay). Gradient accumulation is done in the train step
    (a scan over micro-batches), so this transformation sees one update per optimizer step."""
    sched = learning_rate_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(optax.adamw(learning_rate=sched, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
