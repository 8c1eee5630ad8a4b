"""Explicit FLOP counts for MFU: matmuls of the model per token, GLA layers counted with the chunkwise algorithm.

A multiply-add is 2 FLOPs. Training = forward + backward = 3x the forward count (rematerialisation is not counted,
as usual for MFU). Elementwise work (norms, gates, exp) is ignored.
"""

from __future__ import annotations

SUB_CHUNK = 16

# Dense peak FLOP/s per device for 16-bit matmuls (vendor figures, no sparsity).
PEAK_FLOPS = {
    "gb200": 2.5e15, "b200": 2.25e15, "h200": 989e12, "h100": 989e12, "h800": 989e12, "gh200": 989e12,
    "a100": 312e12, "a800": 312e12, "l40s": 362e12, "l4": 121e12, "a10": 125e12, "v100": 125e12,
    "rtx 4090": 165e12, "rtx 3090": 71e12,
    "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5": 459e12,
    "tpu v4": 275e12,
}


def peak_flops_per_device(device=None, override: float = 0.0) -> float | None:
    """``override`` if > 0, else the table entry matching ``device.device_kind`` (None when unknown, e.g. CPU)."""
    if override and override > 0:
        return float(override)
    if device is None:
        import jax

        device = jax.devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS[name]
    return None


def gla_chunk_flops_per_token(num_heads: int, head_k: int, head_v: int, chunk: int = 64) -> float:
    """Forward FLOPs per token of the chunkwise GLA operator (all heads): per head, the inter-chunk output
    ``(q ⊙ e^b) S`` (2·dk·dv), the state update ``kᵀv`` (2·dk·dv), and the intra-chunk ``A = q kᵀ`` and ``A v`` over
    on average ``(C + c)/2`` keys (causal off-diagonal sub-blocks plus the full diagonal sub-block)."""
    keys = (chunk + SUB_CHUNK) / 2
    per_head = 4 * head_k * head_v + 2 * keys * (head_k + head_v)
    return num_heads * per_head


def _mlp(cfg) -> float:
    return 3 * 2 * cfg.hidden_size * cfg.mlp_intermediate_size


def _head(cfg) -> float:
    return 2 * cfg.hidden_size * cfg.vocab_size


def forward_flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs per token at sequence length ``seq_len`` of a model of any registered family: per layer its
    mixer (the family's counter) and the SwiGLU MLP, plus the output head. ValueError for an unregistered config."""
    from gla_jax.models.registry import family_of

    layer = family_of(cfg).mixer_flops(cfg, seq_len) + _mlp(cfg)
    return cfg.num_hidden_layers * layer + _head(cfg)


def train_flops_per_token(cfg, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def num_params(params) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(params)))
