"""Helpers for packed sequences (``segment_ids: [B, T]``, equal ids = one contiguous document)."""

from __future__ import annotations

import jax.numpy as jnp


def segment_starts(segment_ids):
    """[B, T] bool: True where a new document starts after position 0 (the state must be reset there).

    Position 0 is never a start: the incoming (initial) state belongs to the first document.
    """
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != prev
