"""Autoregressive generation: prefill the prompt once, then decode one token per step in a compiled loop.

Any registered model family decodes through the one cache protocol (docs/design.md §4):
``model.init_cache(batch, prompt + max_new_tokens)`` then ``model(ids, cache=...) -> (logits, cache)``. GLA keeps,
per layer, only its recurrent state ``[B, H, Dk/H, Dv/H]`` (float32) and the short-convolution tails ``[B, W-1, C]``
(it ignores the length): decoding memory and per-token time do not grow with the context. The prompt is run with the
chunkwise operator (``config.impl``); decode steps ask for ``impl="recurrent"`` (the recurrent update; families
without an operator choice ignore it). Transformer++ uses a KV cache of ``prompt + max_new_tokens`` slots.

Batches of prompts with different lengths are left-aligned internally: prompt tokens get segment id 1 and the
padding segment id 0, so GLA's state restarts at the first prompt token and attention never sees padding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gla_jax.models.registry import family_of


@dataclasses.dataclass
class GenerateOutput:
    """tokens: [B, max_new_tokens] int32 (``pad_token_id`` after a row stops); lengths: [B] int32 generated tokens
    per row, a stop token included."""

    tokens: np.ndarray
    lengths: np.ndarray

    def sequences(self) -> list[list[int]]:
        return [list(map(int, row[:n])) for row, n in zip(self.tokens, self.lengths)]


def _check_model(model) -> None:
    family_of(model)  # ValueError unless the model belongs to a registered family
    if not callable(getattr(model, "init_cache", None)):
        raise ValueError(f"model: {type(model).__name__} has no init_cache (the decoding cache protocol)")


def left_align(prompts, prompt_lengths=None, *, padding_side: str = "right", pad_token_id: int = 0):
    """Returns (ids [B, T] int32 left-padded, valid [B, T] bool).

    prompts: a list of token sequences (any lengths >= 1), or a [B, T] integer array whose rows hold
    ``prompt_lengths[b]`` tokens on the ``padding_side`` ("right": tokens first; "left": tokens last).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(prompts, (list, tuple)):
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths: only for array prompts (a list of sequences carries its lengths)")
        rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
        if not rows:
            raise ValueError("prompts: empty batch")
        lengths = np.array([len(r) for r in rows])
        T = int(lengths.max())
        ids = np.full((len(rows), T), pad_token_id, np.int32)
        for b, r in enumerate(rows):
            if len(r):
                ids[b, T - len(r):] = r
    else:
        arr = np.asarray(prompts)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompts must be a list of token sequences or an integer [B, T] array, got "
                             f"{arr.dtype}{list(arr.shape)}")
        B, T = arr.shape
        lengths = np.full((B,), T) if prompt_lengths is None else np.asarray(prompt_lengths).reshape(-1)
        if lengths.shape != (B,):
            raise ValueError(f"prompt_lengths must have shape ({B},), got {lengths.shape}")
        if (lengths > T).any():
            raise ValueError(f"prompt_lengths must be <= the prompt width {T}")
        ids = np.full((B, T), pad_token_id, np.int32)
        for b in range(B):
            n = int(lengths[b])
            if n:
                ids[b, T - n:] = arr[b, :n] if padding_side == "right" else arr[b, T - n:]
    if (lengths < 1).any():
        raise ValueError("prompts: every prompt needs at least one token")
    valid = np.arange(ids.shape[1])[None, :] >= (ids.shape[1] - lengths)[:, None]
    return ids, valid


# ---------------------------------------------------------------------------------------------------------------
# prefill / decode step (pure functions of a model; jit them through nnx.split/merge)

def prefill(model, ids, valid, *, max_new_tokens: int = 0, impl: str | None = None):
    """Runs left-aligned prompts ``ids [B, T]`` (``valid [B, T]`` marks real tokens) into a fresh cache sized
    ``T + max_new_tokens`` (families with a fixed-size state ignore the size).

    Returns (logits [B, T, vocab] float32, cache)."""
    seg = jnp.asarray(valid).astype(jnp.int32)
    cache = model.init_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
    return model(ids, segment_ids=seg, cache=cache, impl=impl)


def decode_step(model, tokens, cache):
    """One token per row: tokens [B] int -> (logits [B, vocab] float32, new cache)."""
    ids = tokens.astype(jnp.int32)[:, None]
    logits, cache = model(ids, segment_ids=jnp.ones_like(ids), cache=cache, impl="recurrent")
    return logits[:, 0], cache


# ---------------------------------------------------------------------------------------------------------------
# sampling

def sample_logits(rng, logits, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """logits [B, V] -> tokens [B] int32. ``temperature <= 0``: greedy (argmax). Else softmax(logits/temperature)
    restricted to the ``top_k`` largest (0 = all) and to the smallest set whose probability reaches ``top_p``."""
    logits = logits.astype(jnp.float32)
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    V = logits.shape[-1]
    if top_k and 0 < top_k < V:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly ahead of each token
        keep_sorted = before < top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, max_new_tokens, temperature, top_k, top_p, impl):
    def run(state, ids, valid, rng, stops, pad_token_id):
        model = nnx.merge(graphdef, state)
        B = ids.shape[0]
        logits, cache = prefill(model, ids, valid, max_new_tokens=max_new_tokens, impl=impl)
        last = logits[:, -1]

        def cond(c):
            i, _, done, *_ = c
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(c):
            i, buf, done, lengths, cache, last, rng = c
            rng, key = jax.random.split(rng)
            tok = sample_logits(key, last, temperature=temperature, top_k=top_k, top_p=top_p)
            tok = jnp.where(done, pad_token_id, tok)
            buf = buf.at[:, i].set(tok)
            lengths = lengths + (~done).astype(jnp.int32)
            done = done | jnp.isin(tok, stops)
            last, cache = decode_step(nnx.merge(graphdef, state), tok, cache)
            return i + 1, buf, done, lengths, cache, last, rng

        buf = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32)
        init = (jnp.zeros((), jnp.int32), buf, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), cache, last, rng)
        _, buf, _, lengths, *_ = jax.lax.while_loop(cond, body, init)
        return buf, lengths

    return jax.jit(run)


def generate(model, prompts, *, max_new_tokens: int, prompt_lengths=None, padding_side: str = "right",
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             pad_token_id: int = 0, seed: int | jax.Array = 0, impl: str | None = None) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` tokens after each prompt (GLA: O(1) state; Transformer++: KV cache).

    Args:
      model: a causal LM of a registered family (GLAForCausalLM, TransformerForCausalLM, ...).
      prompts: list of token sequences, or an int [B, T] array with ``prompt_lengths`` ([B]) and ``padding_side``.
      temperature/top_k/top_p: sampling (temperature 0 = greedy).
      stop_tokens: ids that end a row (the stop token is kept in the output).
      seed: int or PRNG key for sampling.
      impl: GLA operator form for the prefill (default ``config.impl``).
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    _check_model(model)
    ids, valid = left_align(prompts, prompt_lengths, padding_side=padding_side, pad_token_id=pad_token_id)
    rng = jax.random.key(seed) if isinstance(seed, int) else seed
    graphdef, state = nnx.split(model)
    fn = _compiled(graphdef, int(max_new_tokens), float(temperature), int(top_k), float(top_p), impl)
    stops = jnp.asarray([int(t) for t in stop_tokens] or [-1], jnp.int32)
    buf, lengths = fn(state, jnp.asarray(ids), jnp.asarray(valid), rng, stops, jnp.asarray(pad_token_id, jnp.int32))
    return GenerateOutput(np.asarray(buf), np.asarray(lengths))


def cache_bytes(cache) -> int:
    """Bytes held by a decoding cache (GLA states or a KV cache)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))
