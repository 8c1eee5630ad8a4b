"""FLOP counts (``gla_jax.train.flops``) of the scalar-gate families against a count by hand.

A multiply-add is 2 FLOPs, elementwise work is not counted, training is 3x the forward. Per token and layer:
every projection ``in x out`` costs ``2 in out``; a depthwise convolution of ``C`` channels and ``W`` taps ``2 C W``;
the chunked scalar-decay operator per head with key width ``K`` (Mamba2: the state size N) and value width ``V``
(Mamba2: the head dim P) costs ``2 K V`` to read the state, ``2 K V`` to add the token to it, and over on average
``C/2`` earlier keys of its chunk of length ``C`` (``C`` = the chunk length, or the sequence when shorter) the scores
``2 (C/2) K`` and the weighted values ``2 (C/2) V``. The output head is ``2 D vocab``. The projections are also
checked against the model's own weight matrices (2 FLOPs per entry).
"""

from __future__ import annotations

import math

import pytest
from flax import nnx

from gla_jax.train import flops


def _matrix_flops(config, *, prefix: str) -> float:
    """2 x the entries of the model's weight matrices under ``model.layers.<prefix>`` per layer (the stacked layer
    axis divided out): the projections' forward FLOPs per token, counted from the parameters themselves."""
    from gla_jax.models import build_model

    model = nnx.eval_shape(lambda r: build_model(config, rngs=r), nnx.Rngs(0))
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = tuple(map(str, path))
        if names[:3] == ("model", "layers", prefix) and names[-1] == "kernel":
            total += 2 * math.prod(var.get_value().shape[1:])
    return total


def test_mamba2_flops_match_the_hand_count():
    from gla_jax.models.mamba2 import Mamba2Config

    c = Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=2, expand=2, conv_kernel=4,
                     chunk_size=16, num_hidden_layers=2, vocab_size=50, tie_word_embeddings=True)
    # D = 32, inner I = 64, heads H = 4 of P = 16, state N = 8, groups G = 2, chunk C = 16
    in_proj = 2 * 32 * (64 + 64 + 2 * 2 * 8 + 4)  # z and x (I each), B and C (G N each), dt (H)
    out_proj = 2 * 64 * 32
    conv = 2 * (64 + 2 * 2 * 8) * 4  # over x, B and C
    ssd_64 = 4 * (2 * 8 * 16 + 2 * 8 * 16 + 2 * 8 * 8 + 2 * 8 * 16)  # T = 64 > C: C/2 = 8 keys on average
    ssd_8 = 4 * (2 * 8 * 16 + 2 * 8 * 16 + 2 * 4 * 8 + 2 * 4 * 16)  # T = 8 < C: 4 keys on average
    head = 2 * 32 * 50  # tied: the embedding matrix; Mamba2 blocks have no MLP
    assert _matrix_flops(c, prefix="attn") == in_proj + out_proj
    for T, ssd in ((64, ssd_64), (8, ssd_8)):
        want = 2 * (in_proj + out_proj + conv + ssd) + head
        assert flops.forward_flops_per_token(c, T) == pytest.approx(want, rel=1e-12), T
        assert flops.train_flops_per_token(c, T) == pytest.approx(3 * want, rel=1e-12)
    assert want == 2 * (10496 + 4096 + 768 + 2816) + 3200  # the same sum in numbers (T = 8)


def test_retnet_flops_match_the_hand_count():
    from gla_jax.models.retnet import RetNetConfig

    c = RetNetConfig(hidden_size=32, num_heads=2, expand_k=1.0, expand_v=2.0, intermediate_size=48,
                     num_hidden_layers=2, vocab_size=50, chunk_size=16, tie_word_embeddings=False)
    # D = 32, keys Dk = 32 (2 heads of K = 16), values Dv = 64 (V = 32), output gate, SwiGLU width 48, chunk 16
    proj = 2 * 32 * 32 + 2 * 32 * 32 + 2 * 32 * 64 + 2 * 32 * 64 + 2 * 64 * 32  # q, k, v, gate, out
    retention = 2 * (2 * 16 * 32 + 2 * 16 * 32 + 2 * 8 * 16 + 2 * 8 * 32)  # T = 64: 8 keys on average
    mlp = 3 * 2 * 32 * 48
    head = 2 * 32 * 50
    assert _matrix_flops(c, prefix="attn") == proj
    want = 2 * (proj + retention + mlp) + head
    assert flops.forward_flops_per_token(c, 64) == pytest.approx(want, rel=1e-12)
    assert want == 2 * (16384 + 5632 + 9216) + 3200
    # grouped kv heads: k and v projections shrink by the group size, the operator does not
    g = c.replace(num_kv_heads=1)
    assert flops.forward_flops_per_token(c, 64) - flops.forward_flops_per_token(g, 64) == \
        2 * (2 * 32 * 16 + 2 * 32 * 32)
    # no output gate: its projection goes
    assert flops.forward_flops_per_token(c, 64) - flops.forward_flops_per_token(c.replace(use_output_gate=False), 64) \
        == 2 * (2 * 32 * 64)
