"""The public GLA operator: one entry point over the registered implementations (docs/design.md §5)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gla_jax.ops import registry
from gla_jax.ops.checks import check_gla_inputs, query_scale


def resolve_impl(impl: str, *, platform: str | None = None, interpret: bool = False) -> str:
    """The canonical name of the backend that ``impl`` selects on ``platform`` (default: jax's default backend);
    ``"auto"`` picks the best validated native backend, else ``"chunk"`` (see ``gla_jax.ops.registry.resolve``)."""
    platform = jax.default_backend() if platform is None else platform
    return registry.resolve(impl, platform=platform, interpret=interpret).name


def _axes_tuple(axes, name: str) -> tuple[str, ...]:
    if axes is None:
        return ()
    axes = (axes,) if isinstance(axes, str) else axes
    if not isinstance(axes, (tuple, list)) or not all(isinstance(a, str) for a in axes):
        raise ValueError(f"{name}: expected a mesh axis name, a tuple of them or None, got {axes!r}")
    return tuple(axes)


def _mesh_axes_for(axes: tuple[str, ...], size: int, mesh, used: set, name: str):
    """The longest prefix of ``axes`` (minus size-1, manual and already used axes) whose sizes divide ``size``;
    None for no sharding, a name for one axis, a tuple for several."""
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    shape = dict(mesh.shape)
    for a in axes:
        if a not in shape:
            raise ValueError(f"{name}: the mesh has no axis {a!r} (its axes: {', '.join(mesh.axis_names)})")
    keep = tuple(a for a in axes if shape[a] > 1 and a not in manual and a not in used)
    while keep and size % math.prod(shape[a] for a in keep):
        keep = keep[:-1]
    used.update(keep)
    return None if not keep else keep[0] if len(keep) == 1 else keep


def _shard_mapped(fn, mesh, b_ax, h_ax, has_init: bool, has_seg: bool, final: bool, scalar_gate: bool = False):
    """``fn`` (a kernel function) run per shard with ``jax.shard_map``: batch over ``b_ax``, heads over ``h_ax``,
    the rest replicated; ``final``: the final state is returned; ``scalar_gate``: g is [B, T, H]. Every (batch,
    head) pair is an independent GLA problem, so no communication is needed."""
    x_spec, s_spec = P(b_ax, None, h_ax, None), P(b_ax, h_ax, None, None)
    g_spec = P(b_ax, None, h_ax) if scalar_gate else x_spec
    in_specs = [x_spec] * 3 + [g_spec] + ([s_spec] if has_init else []) + ([P(b_ax, None)] if has_seg else [])
    out_specs = (x_spec, s_spec) if final else (x_spec,)

    def run(q, k, v, g, *, initial_state, segment_ids, output_final_state, **kw):
        assert output_final_state == final

        def local(q, k, v, g, *rest):
            rest = list(rest)
            init = rest.pop(0) if has_init else None
            seg = rest.pop(0) if has_seg else None
            o, s = fn(q, k, v, g, initial_state=init, segment_ids=seg, output_final_state=final, **kw)
            return (o, s) if final else (o,)

        args = [q, k, v, g] + ([initial_state] if has_init else []) + ([segment_ids] if has_seg else [])
        res = jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs, check_vma=False)(*args)
        return (res[0], res[1]) if final else (res[0], None)

    return run


def gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
        impl="auto", chunk_size=64, interpret=False, batch_axes=None, head_axes=None):
    """Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t,  o_t = (scale q_t) S_t.

    Args:
      q, k: [B, T, H, K] queries and keys (float32/bfloat16/float16).
      v: [B, T, H, V] values.
      g: [B, T, H, K] log forget gates, or [B, T, H] scalar gates (one log decay per head and step, shared by all
        K channels: the RetNet / Mamba2 form). Scalar gates run the one-level scalar-gate chunk form
        (``gla_jax.ops.scalar``) when the chosen backend has one ("chunk", hence "auto" on every platform today);
        any other backend gets the gate broadcast over K (dg then comes back summed over K, shape [B, T, H]).
        Must be <= 0 (not checked: values are unknown under jit). g = -inf (any g <= ``gates.ZERO_LOG_GATE`` =
        -104) is a zero gate, α = 0: that channel's past is forgotten exactly as in the recurrence, in every impl
        and for both gate shapes; outputs and gradients stay finite, and dg there is 0 (the limit g -> -inf).
      scale: query scale, default K ** -0.5.
      initial_state: [B, H, K, V] state before position 0 (float32 recommended); it belongs to the first document.
      output_final_state: also return the state after position T-1 ([B, H, K, V] float32).
      segment_ids: [B, T] integer document ids of packed rows (documents contiguous); the state resets at each
        document start so nothing flows between documents.
      impl: a registered backend (``gla_jax.ops.registry.choices()``): "auto" (the best validated kernel native to
        the platform, else "chunk"), "chunk" (alias "xla"), "recurrent", "parallel", "triton" (alias "pallas", GPU).
      chunk_size: chunk length of the chunkwise forms (power of two >= 16; sub-chunks of 16 in the kernels, the
        pure-JAX form bisects down to single rows on CPU, docs/design.md §1).
      interpret: run a Pallas kernel backend in interpret mode (any platform; slow, for tests).
      batch_axes, head_axes: mesh axis names (a name or a tuple) to split B and H over. Used only when a Pallas
        kernel backend runs under a mesh (``jax.set_mesh``): the kernel is then wrapped in ``jax.shard_map`` (a
        custom call the compiler cannot split). Axes that do not divide B or H are dropped. Pure-JAX backends are
        partitioned by XLA and ignore them.

    Returns:
      (o [B, T, H, V] in the inputs' dtype, final_state [B, H, K, V] float32 or None).

    Non-finite inputs: a NaN in q, k, v or g, or an infinity in q, k or v (or g = +inf, against the contract), at
    position t of batch row b and head h makes the outputs of that row and head non-finite from position P on (at
    the latest from t) and leaves every earlier position, every other row and head bit-for-bit as without it: P = t for "recurrent", P = floor(t / C) * C (the start of t's chunk,
    C = ``chunk_size``; the Mosaic TPU kernels use C = 128) for "chunk" and "pallas", P = 0 for "parallel" (its
    quadratic products mix every position). Gradients: a non-finite input may make every gradient of the call
    non-finite (autodiff through the recurrence does the same: 0 * NaN is NaN).
    """
    B, T, H, K, V = check_gla_inputs(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                                     impl=impl, chunk_size=chunk_size)
    batch_axes, head_axes = _axes_tuple(batch_axes, "batch_axes"), _axes_tuple(head_axes, "head_axes")
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    scale = query_scale(scale, K)
    platform = jax.default_backend()
    scalar_gate = g.ndim == 3
    problem = registry.Problem(B, T, H, K, V, jnp.dtype(out_dtype).name, chunk_size, segment_ids is not None,
                               initial_state is not None, platform, bool(interpret), scalar_gate)
    backend = registry.resolve(impl, platform=platform, interpret=interpret, problem=problem)
    fn = registry.scalar_kernel(backend) if scalar_gate else None
    if fn is None:
        fn = registry.kernel(backend)
        if scalar_gate:  # no scalar-gate kernel: the gate broadcast over K (autodiff sums dg back over K)
            g = jnp.broadcast_to(g[..., None], (B, T, H, K))
            scalar_gate = False
    mesh = jax.sharding.get_abstract_mesh()
    if not backend.pure_jax and mesh is not None and not mesh.empty and (batch_axes or head_axes):
        used: set = set()
        b_ax = _mesh_axes_for(batch_axes, B, mesh, used, "batch_axes")
        h_ax = _mesh_axes_for(head_axes, H, mesh, used, "head_axes")
        if b_ax is not None or h_ax is not None:
            fn = _shard_mapped(fn, mesh, b_ax, h_ax, initial_state is not None, segment_ids is not None,
                               bool(output_final_state), scalar_gate)
    o, s = fn(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=bool(output_final_state),
              segment_ids=segment_ids, chunk_size=chunk_size, interpret=interpret)
    return o.astype(out_dtype), (s.astype(jnp.float32) if output_final_state else None)
