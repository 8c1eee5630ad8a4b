"""The public GLA operator: one entry point over the recurrent, parallel, chunkwise and Pallas forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gla_jax.ops.checks import check_gla_inputs
from gla_jax.ops.parallel import gla_parallel
from gla_jax.ops.recurrent import gla_recurrent


def _pallas_available() -> bool:
    try:
        from gla_jax.kernels import chunk_gla  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str) -> str:
    """Maps ``"auto"`` to the form used on the current default backend (Pallas on GPU, else ``"chunk"``)."""
    if impl != "auto":
        return impl
    return "pallas" if jax.default_backend() == "gpu" and _pallas_available() else "chunk"


def gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
        impl="auto", chunk_size=64):
    """Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t,  o_t = (scale q_t) S_t.

    Args:
      q, k: [B, T, H, K] queries and keys (float32/bfloat16/float16).
      v: [B, T, H, V] values.
      g: [B, T, H, K] log forget gates; must be <= 0 (not checked: values are unknown under jit). g = -inf (any
        g <= ``gates.ZERO_LOG_GATE`` = -104) is a zero gate, α = 0: that channel's past is forgotten exactly as in
        the recurrence, in every impl; outputs and gradients stay finite, and dg there is 0 (the limit g -> -inf).
      scale: query scale, default K ** -0.5.
      initial_state: [B, H, K, V] state before position 0 (float32 recommended); it belongs to the first document.
      output_final_state: also return the state after position T-1 ([B, H, K, V] float32).
      segment_ids: [B, T] integer document ids of packed rows (documents contiguous); the state resets at each
        document start so nothing flows between documents.
      impl: "auto" (Pallas on GPU, else "chunk"), "chunk", "recurrent", "parallel" or "pallas".
      chunk_size: chunk length of the chunkwise forms (power of two >= 16; sub-chunks are 16).

    Returns:
      (o [B, T, H, V] in the inputs' dtype, final_state [B, H, K, V] float32 or None).

    Non-finite inputs: a NaN in q, k, v or g, or an infinity in q, k or v (or g = +inf, against the contract), at
    position t of batch row b and head h makes the outputs of that row and head non-finite from position P on (at
    the latest from t) and leaves every earlier position, every other row and head bit-for-bit as without it: P = t for "recurrent", P = floor(t / C) * C (the start of t's chunk,
    C = ``chunk_size``; the Mosaic TPU kernels use C = 128) for "chunk" and "pallas", P = 0 for "parallel" (its
    quadratic products mix every position). Gradients: a non-finite input may make every gradient of the call
    non-finite (autodiff through the recurrence does the same: 0 * NaN is NaN).
    """
    check_gla_inputs(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids, impl=impl,
                     chunk_size=chunk_size)
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    impl = resolve_impl(impl)
    if impl == "recurrent":
        o, s = gla_recurrent(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    elif impl == "parallel":
        o, s = gla_parallel(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
    elif impl == "chunk":
        from gla_jax.ops.chunk import gla_chunk

        o, s = gla_chunk(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                         chunk_size=chunk_size)
    else:  # pallas
        if not _pallas_available():
            raise NotImplementedError("impl='pallas': the Pallas kernel (gla_jax.kernels.chunk_gla) is not available")
        from gla_jax.kernels import chunk_gla

        o, s = chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=True,
                         segment_ids=segment_ids, chunk_size=chunk_size,
                         interpret=jax.default_backend() != "gpu")
    return o.astype(out_dtype), (s.astype(jnp.float32) if output_final_state else None)
