"""The token embeddings and language-model head shared by GLA and Transformer++ (untied projection or tied)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from gla_jax.layers.sharding import with_axes


def token_embeddings(config, *, rngs: nnx.Rngs) -> nnx.Embed:
    """``nnx.Embed`` vocab -> D (table [vocab, embed]), normal(initializer_range) init."""
    return nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.compute_dtype,
                     param_dtype=config.params_dtype,
                     embedding_init=with_axes(nnx.initializers.normal(config.initializer_range), ("vocab", "embed")),
                     rngs=rngs)


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
