"""The built-in GLA operator backends, one ``register`` call each (docs/design.md §5).

To add a backend (a folder under ``kernels/`` with a ``chunk_gla`` entry), add one ``register(Backend(...))`` call
here; its ``load`` imports the kernel on first use, so importing this module stays cheap and jax-only. A backend
with a kernel specialised for scalar gates (g [B, T, H]) passes it as ``load_scalar``; the others get the gate
broadcast over K. Only ``chunk`` has one (``gla_jax.ops.scalar.gla_scalar``, the one-level scalar-gate chunk form).

| name        | aliases  | platforms | validated | priority | what                                         |
|-------------|----------|-----------|-----------|----------|----------------------------------------------|
| ``chunk``   | ``xla``  | all       | yes       | 0        | pure-JAX two-level chunkwise form (fallback) |
| ``recurrent``|         | all       | yes       | -10      | pure-JAX scan over time (ground truth)       |
| ``parallel``|          | all       | yes       | -20      | pure-JAX quadratic form (checks, short T)    |
| ``triton``  | ``pallas``| gpu      | no        | 20       | Pallas Triton kernels, ``kernels/triton/``   |
| ``mosaic_gpu``|        | gpu       | no        | 30       | Pallas Mosaic GPU (Hopper), ``kernels/mosaic_gpu/`` |
| ``mosaic_tpu``|        | tpu       | no        | 20       | Pallas Mosaic TPU, ``kernels/mosaic_tpu/``   |
"""

from __future__ import annotations

from gla_jax.ops.registry import Backend, Problem, register

#: ``impl="parallel"`` refuses calls whose float32 intermediates would exceed this many bytes (estimate below).
PARALLEL_MEMORY_LIMIT_BYTES = 8 * 2**30


def parallel_memory_bytes(batch: int, seq_len: int, heads: int, key_dim: int) -> int:
    """Bytes the parallel form materialises: about three float32 [B, T, T, H, K] arrays (the pairwise gate sums,
    their masked exponential, and the product the q·k·decay contraction forms), forward or backward."""
    return 3 * 4 * batch * seq_len * seq_len * heads * key_dim


def _parallel_supports(p: Problem) -> str | None:
    need = parallel_memory_bytes(p.batch, p.seq_len, p.heads, p.key_dim)
    if need > PARALLEL_MEMORY_LIMIT_BYTES:
        return (f"it would materialise ~{need / 2**30:.1f} GiB of [B, T, T, H, K] float32 intermediates (limit "
                f"{PARALLEL_MEMORY_LIMIT_BYTES / 2**30:.0f} GiB); use impl='chunk'")
    return None


def _triton_supports(p: Problem) -> str | None:
    if p.interpret:
        return None
    import jax

    try:
        device = jax.devices(p.platform)[0]
    except RuntimeError:
        return None
    cc = getattr(device, "compute_capability", None)  # CUDA devices report e.g. "9.0"
    try:
        too_old = cc is not None and float(cc) < 8.0
    except (TypeError, ValueError):
        too_old = False
    return f"the Triton kernels need CUDA compute capability >= 8.0, this GPU reports {cc}" if too_old else None


def _compute_capability(platform: str):
    """The first ``platform`` device's CUDA compute capability as a float (e.g. 9.0), or None where unknown."""
    import jax

    try:
        cc = getattr(jax.devices(platform)[0], "compute_capability", None)
        return None if cc is None else float(cc)
    except (RuntimeError, TypeError, ValueError):
        return None


def _mosaic_gpu_supports(p: Problem) -> str | None:
    if p.chunk_size != 64:
        return f"the Mosaic GPU kernels tile chunks of 64 (one wgmma M), got chunk_size={p.chunk_size}"
    if p.dtype not in ("bfloat16", "float16"):
        return f"the Mosaic GPU kernels take bfloat16/float16 inputs (wgmma operands), got {p.dtype}; use impl='triton'"
    if p.key_dim > 256:
        return f"the Mosaic GPU kernels hold K <= 256 in shared memory, got K={p.key_dim}"
    cc = None if p.interpret else _compute_capability(p.platform)
    if cc is not None and not 9.0 <= cc < 10.0:
        return f"the Mosaic GPU kernels need a Hopper GPU (sm_90a), this GPU reports compute capability {cc}"
    return None


def _load_mosaic_gpu():
    from gla_jax.kernels.mosaic_gpu import chunk_gla

    return chunk_gla


def tpu_generation(device_kind: str) -> str:
    """The Mosaic TPU tiling target for a jax ``device_kind`` ("TPU v6 lite" -> "v6e"); "v5e" (the smallest scoped
    VMEM of the shipped targets) when unknown."""
    kind = device_kind.lower()
    for tag, generation in (("v6", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5", "v5p"), ("v4", "v4")):
        if tag in kind:
            return generation
    return "v5e"


def _load_mosaic_tpu():
    import jax

    from gla_jax.kernels.mosaic_tpu import chunk_gla

    def mosaic_tpu(q, k, v, g, *, scale, initial_state, output_final_state, segment_ids, chunk_size, interpret):
        generation = "v5e" if interpret else tpu_generation(jax.devices("tpu")[0].device_kind)
        return chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                         segment_ids=segment_ids, chunk_size=chunk_size, interpret=interpret, generation=generation)

    return mosaic_tpu


def _load_chunk():
    from gla_jax.ops.chunk import gla_chunk

    def chunk(q, k, v, g, *, scale, initial_state, output_final_state, segment_ids, chunk_size, interpret):
        o, s = gla_chunk(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                         chunk_size=chunk_size)
        return o, (s if output_final_state else None)

    return chunk


def _load_scalar():
    from gla_jax.ops.scalar import gla_scalar

    def scalar(q, k, v, g, *, scale, initial_state, output_final_state, segment_ids, chunk_size, interpret):
        return gla_scalar(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                          segment_ids=segment_ids, chunk_size=chunk_size)

    return scalar


def _load_recurrent():
    from gla_jax.ops.recurrent import gla_recurrent

    def recurrent(q, k, v, g, *, scale, initial_state, output_final_state, segment_ids, chunk_size, interpret):
        o, s = gla_recurrent(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
        return o, (s if output_final_state else None)

    return recurrent


def _load_parallel():
    from gla_jax.ops.parallel import gla_parallel

    def parallel(q, k, v, g, *, scale, initial_state, output_final_state, segment_ids, chunk_size, interpret):
        o, s = gla_parallel(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
        return o, (s if output_final_state else None)

    return parallel


def _load_triton():
    from gla_jax.kernels.triton import chunk_gla

    return chunk_gla  # already has the kernel signature


register(Backend("chunk", _load_chunk, platforms=None, validated=True, priority=0, aliases=("xla",), pure_jax=True,
                 load_scalar=_load_scalar,
                 description="pure-JAX two-level chunkwise form; runs everywhere (the fallback of impl='auto'); "
                             "scalar gates [B, T, H] run the one-level scalar-gate form (gla_jax/ops/scalar.py)"))
register(Backend("recurrent", _load_recurrent, platforms=None, validated=True, priority=-10, pure_jax=True,
                 description="pure-JAX scan over time; the ground truth, slow"))
register(Backend("parallel", _load_parallel, platforms=None, validated=True, priority=-20, pure_jax=True,
                 supports=_parallel_supports,
                 description="pure-JAX quadratic form, O(T^2 K) memory; for checks and short sequences"))
register(Backend("triton", _load_triton, platforms=("gpu",), validated=False, priority=20, aliases=("pallas",),
                 supports=_triton_supports,
                 description="Pallas GPU kernels lowered through Triton (kernels/triton/); not yet run on a GPU"))
register(Backend("mosaic_gpu", _load_mosaic_gpu, platforms=("gpu",), validated=False, priority=30,
                 supports=_mosaic_gpu_supports,
                 description="Pallas Mosaic GPU kernels for Hopper (kernels/mosaic_gpu/); not yet run on a GPU"))
register(Backend("mosaic_tpu", _load_mosaic_tpu, platforms=("tpu",), validated=False, priority=20,
                 description="Pallas Mosaic TPU kernels (kernels/mosaic_tpu/); not yet run on a TPU"))
