"""Device mesh (``data`` x ``fsdp`` x ``tensor``) and logical-axis rules.

Parameters carry logical axis names (``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``) in their flax NNX sharding
metadata; activations use ``batch``, ``seq``, ``embed``. The rules map them onto mesh axes:

    batch -> (data, fsdp)        embed (parameters) -> fsdp        heads, kv, mlp, vocab -> tensor

A mesh axis of size 1 is dropped from a spec, a mesh axis is used at most once per spec, and a dimension that the
mesh axes do not divide evenly is left replicated (so odd sizes never fail, they just shard less). The GLA operator
shard-maps kernel backends itself over the mesh axes of ``batch`` and ``heads`` (``gla_jax.ops.gla``, docs/design.md
§5); nothing here is read at trace time.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gla_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")

PARAM_RULES: dict[str, tuple[str, ...]] = {
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "batch": ("data", "fsdp"),
}
ACTIVATION_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "embed": (),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves a ``MeshSection`` (one entry may be -1) against ``num_devices``; ValueError naming the key."""
    dims = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if num_devices % known:
            raise UserError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                             f"(data={mesh_cfg.data}, fsdp={mesh_cfg.fsdp}, tensor={mesh_cfg.tensor})")
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) > num_devices:
        raise UserError(f"mesh: data*fsdp*tensor = {math.prod(dims)} exceeds the {num_devices} available devices")
    return tuple(dims)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor). Uses the first ``data*fsdp*tensor`` devices (all processes')."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    n = math.prod(shape)
    if n < len(devices) and jax.process_count() > 1:
        raise UserError(f"mesh: a multi-process run must use all {len(devices)} devices, got {shape}")
    if n < len(devices):
        import sys

        print(f"warning: mesh: data*fsdp*tensor = {n} uses {n} of the {len(devices)} devices; "
              f"{len(devices) - n} stay idle (make the product {len(devices)}, or set one axis to -1)",
              file=sys.stderr, flush=True)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices[:n], allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - fall back to the plain order (CPU, odd shapes)
        arr = np.asarray(devices[:n], dtype=object).reshape(shape)
    return Mesh(arr, AXES)


def _axis_size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names, shape, mesh: Mesh, rules: dict) -> P:
    """Maps a tuple of logical axis names (None = unsharded) for an array of ``shape`` to a ``PartitionSpec``."""
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, names or ()):
        axes = tuple(a for a in rules.get(name, ()) if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        # keep the longest prefix of mesh axes that divides this dimension
        while axes and dim % _axis_size(mesh, axes):
            axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    out += [None] * (len(shape) - len(out))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _variable_names(var):
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names) if not isinstance(names, P) else tuple(names)
    return None


def state_shardings(abstract_state, mesh: Mesh, rules: dict = PARAM_RULES):
    """NamedShardings for an NNX state (of Variables holding arrays or ShapeDtypeStructs) from their logical names.

    Returns a pytree of the same structure as the *pure* state (``nnx.State`` of values, not Variables).
    """
    from flax import nnx

    def one(var):
        value = var.get_value()
        names = _variable_names(var)
        spec = logical_to_spec(names, value.shape, mesh, rules) if names else P()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_spec(mesh: Mesh, batch: int, ndim: int = 2) -> P:
    """Spec of a ``[batch, ...]`` array: batch over (data, fsdp), the rest replicated."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), (batch,) + (1,) * (ndim - 1), mesh, ACTIVATION_RULES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
