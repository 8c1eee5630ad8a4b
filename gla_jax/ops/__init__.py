"""The GLA operator: ``gla(q, k, v, g, ...)``, its reference forms, and the backend registry (``registry``)."""

from gla_jax.ops.api import gla, resolve_impl
from gla_jax.ops.parallel import gla_parallel
from gla_jax.ops.recurrent import gla_recurrent
from gla_jax.ops.registry import Backend, register, unregister

__all__ = ["gla", "gla_parallel", "gla_recurrent", "resolve_impl", "Backend", "register", "unregister"]
