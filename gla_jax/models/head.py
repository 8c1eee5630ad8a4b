"""The language-model head shared by GLA and Transformer++: an untied projection or the tied embedding matrix."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.sharding import with_axes


def lm_head(config, *, rngs: nnx.Rngs):
    """``nnx.Linear`` D -> vocab without bias (kernel [embed, vocab]), or None when ``config.tie_word_embeddings``."""
    if config.tie_word_embeddings:
        return None
    return nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=config.compute_dtype,
                      param_dtype=config.params_dtype,
                      kernel_init=with_axes(nnx.initializers.normal(config.initializer_range), ("embed", "vocab")),
                      rngs=rngs)


def lm_logits(hidden, embeddings: nnx.Embed, head):
    """hidden [..., D] -> logits [..., vocab] float32, through ``head`` or, when it is None, the tied embeddings."""
    out = embeddings.attend(hidden) if head is None else head(hidden)
    return out.astype(jnp.float32)
