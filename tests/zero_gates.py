"""Where the tests put zero forget gates (α = 0, log gate −inf or any g <= −104): named patterns over [B, T, H, K].

Shared by the operator and kernel tests, so every implementation is checked on the same placements: at the first
position, in the middle of a chunk and of a sub-chunk, on both sides of chunk boundaries (64 for the chunkwise
form and the Triton kernels, 128 for the Mosaic kernels), several in one chunk and one sub-chunk, and scattered
single channels. Some are finite but far below the floor (−1e30, −200), which float32 also rounds to α = 0.
"""

from __future__ import annotations

import numpy as np

PATTERNS = ("first", "mid_chunk", "chunk_boundary", "several_in_chunk", "scattered")


def place_zero_gates(g, pattern, seed=0):
    """A copy of g [B, T, H, K] (float32 numpy) with zero gates placed by ``pattern`` (one of ``PATTERNS``)."""
    g = np.array(g, np.float32, copy=True)
    B, T, H, K = g.shape
    rng = np.random.default_rng(seed)
    some = lambda: rng.random(K) < 0.5  # a random half of the channels

    def at(t, h=slice(None), ch=slice(None), value=-np.inf):
        if t < T:
            g[:, t, h, ch] = value

    if pattern == "first":  # head 0 forgets the initial state completely; the other heads keep it
        at(0, 0)
    elif pattern == "mid_chunk":
        at(37, ch=some())
        at(min(T - 1, 90), 0)
    elif pattern == "chunk_boundary":
        for t in (63, 64, 127, 128):
            at(t, ch=some())
    elif pattern == "several_in_chunk":
        for t in (5, 6, 20, 33):
            at(t, ch=some())
        at(21, ch=some(), value=-1e30)
        at(50, value=-200.0)
    elif pattern == "scattered":
        g[rng.random(g.shape) < 0.05] = -np.inf
    else:
        raise ValueError(f"pattern: expected one of {PATTERNS}, got {pattern!r}")
    return g
