"""Logical axis names for parameters and activations, and a no-op-by-default activation constraint.

Parameters carry logical names as NNX metadata (``nnx.get_partition_spec(nnx.state(model))`` returns them); the
training code maps them onto a device mesh with its own rules. Names used by the models:

- ``embed``: the model width D (embeddings, projections' input/output side)
- ``heads``: flattened query-head features (q/g projections' output, o projection's input, q short conv)
- ``kv``: flattened key/value features of the (possibly fewer) kv heads (k/v/gk projections, k/v short convs)
- ``mlp``: the SwiGLU intermediate width
- ``vocab``: the vocabulary
- ``layers``: the leading layer axis of the stacked blocks' parameters (docs/design.md §4; the trainer's rules do not
  shard it)
- ``None``: replicated (norm weights, conv taps, low-rank gate input side)

Activations: ``batch``, ``seq``, ``embed`` (see :func:`constrain`); the GLA layer also asks :func:`mesh_axes` for
``batch`` and ``heads`` to pass to the operator, which shard-maps kernel backends over them.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx
from flax.core import spmd as _spmd
from jax.sharding import PartitionSpec

PARAM_AXES = ("embed", "heads", "kv", "mlp", "vocab", "layers")
ACTIVATION_AXES = ("batch", "seq", "embed")

def with_axes(init, names: Sequence[str | None]):
    """Wraps an initializer so the created ``nnx.Param`` carries logical axis ``names`` (no eager sharding)."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def param(init, key, shape, dtype, names: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` of ``shape``/``dtype`` made by ``init(key, shape, dtype)`` with logical axis ``names``."""
    return nnx.Param(init(key, shape, dtype), out_sharding=tuple(names), eager_sharding=False)


def logical_to_mesh(names: Sequence[str | None], rules) -> PartitionSpec:
    """Maps logical names to mesh axes with ``rules`` ((logical, mesh_axis_or_None), ...); unknown names -> None."""
    table = dict(rules)
    return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def mesh_axes(name: str) -> tuple[str, ...] | None:
    """Mesh axes that the active logical axis rules (``nnx.logical_axis_rules``) map logical ``name`` to, keeping
    those of the current mesh (``jax.set_mesh``); None when no rules or no mesh are active, or nothing maps."""
    rules = _spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh is None or mesh.empty:
        return None
    axes = dict(rules).get(name)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.axis_names)
    return axes or None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op unless a mesh (``jax.set_mesh``) and logical axis rules
    (``nnx.logical_axis_rules``) are both active."""
    rules = _spmd.get_logical_axis_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_mesh(names, rules)
    if mesh.axis_types and all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, spec)  # explicit axes: with_sharding_constraint would only assert
    return jax.lax.with_sharding_constraint(x, spec)
