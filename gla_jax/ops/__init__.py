"""The GLA operator: ``gla(q, k, v, g, ...)`` and its reference forms."""

from gla_jax.ops.api import gla, resolve_impl
from gla_jax.ops.parallel import gla_parallel
from gla_jax.ops.recurrent import gla_recurrent

__all__ = ["gla", "gla_parallel", "gla_recurrent", "resolve_impl"]
