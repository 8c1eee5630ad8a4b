"""The registry of GLA operator implementations ("backends") and the rule that picks one (docs/design.md §5).

A backend is a ``Backend`` record: a name (plus aliases), a zero-argument ``load`` that imports and returns its
kernel function, the jax platforms it runs on natively, whether it has run on real hardware (``validated``), a
priority for ``impl="auto"`` and an optional ``supports(problem)`` that names why a call cannot run. A kernel
function has the signature

    fn(q, k, v, g, *, scale, initial_state, output_final_state, segment_ids, chunk_size, interpret)
        -> (o [B, T, H, V], final_state [B, H, K, V] float32 or None)

with g [B, T, H, K]. Scalar gates (g [B, T, H], one log decay per head and step) go to the backend's
``load_scalar`` kernel (same signature, g [B, T, H]) when it has one; otherwise ``gla`` broadcasts the gate over K
and runs the ordinary kernel, so every backend accepts both gate shapes.

The built-ins are registered in ``gla_jax.ops.backends`` (one ``register`` call each); a new backend is one more
call there. This module is jax-only and imports no backend until one is used.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, NamedTuple

AUTO = "auto"
#: What ``impl="auto"`` falls back to: the pure-JAX chunkwise form, which runs on every platform.
FALLBACK = "chunk"


class Problem(NamedTuple):
    """What a backend's ``supports`` sees of one call (shapes, dtype, options, where it runs)."""

    batch: int
    seq_len: int
    heads: int
    key_dim: int
    value_dim: int
    dtype: str  # the inputs' result dtype name, e.g. "bfloat16"
    chunk_size: int
    segmented: bool  # segment_ids given
    initial_state: bool  # initial_state given
    platform: str  # jax platform the call runs on: "cpu", "gpu", "tpu"
    interpret: bool  # Pallas interpret mode asked for
    scalar_gate: bool = False  # g is [B, T, H] (one gate per head and step) rather than [B, T, H, K]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the GLA operator.

    name: the ``impl`` value that selects it; aliases: other accepted values.
    load: zero-argument callable returning the kernel function (imports happen here, on first use).
    platforms: jax platforms it runs on natively (``("gpu",)``), or None for every platform.
    validated: it has run correctly on real hardware of those platforms; ``impl="auto"`` picks only validated ones.
    priority: ``impl="auto"`` takes the highest-priority validated native backend.
    supports: optional ``supports(problem: Problem) -> str | None``: a one-line reason when the call cannot run.
    pure_jax: plain jnp/lax code (runs anywhere, XLA partitions it over a mesh); otherwise a Pallas kernel, which
      has an interpret mode and is wrapped in ``jax.shard_map`` under a mesh.
    description: one line for listings.
    load_scalar: optional zero-argument callable returning a kernel function for scalar gates g [B, T, H] (same
      signature); without one, a scalar gate is broadcast over K for ``load``'s kernel.
    """

    name: str
    load: Callable[[], Callable]
    platforms: tuple[str, ...] | None = None
    validated: bool = False
    priority: int = 0
    supports: Callable[[Problem], str | None] | None = None
    aliases: tuple[str, ...] = ()
    pure_jax: bool = False
    description: str = ""
    load_scalar: Callable[[], Callable] | None = None

    def native(self, platform: str) -> bool:
        """True when ``platform`` is one this backend was written for (a pure-JAX backend is native nowhere)."""
        return self.platforms is not None and platform in self.platforms

    def runs_on(self, platform: str) -> bool:
        return self.platforms is None or platform in self.platforms


_BACKENDS: dict[str, Backend] = {}  # canonical name -> backend
_ALIASES: dict[str, str] = {}  # alias -> canonical name
_LOADED: dict[str, Callable] = {}  # canonical name -> loaded kernel function
_LOADED_SCALAR: dict[str, Callable] = {}  # canonical name -> loaded scalar-gate kernel function
_WARNED: set[tuple[str, str]] = set()
_builtins_done = False


def _ensure_builtins() -> None:
    global _builtins_done
    if not _builtins_done:
        _builtins_done = True
        import gla_jax.ops.backends  # noqa: F401  (registers the built-ins)


def register(backend: Backend, *, replace: bool = False) -> Backend:
    """Adds ``backend``; a name or alias already taken is a ValueError unless ``replace`` (same name only)."""
    _ensure_builtins()
    if not isinstance(backend, Backend):
        raise ValueError(f"backend: expected a Backend, got {type(backend).__name__}")
    if not backend.name or not isinstance(backend.name, str) or backend.name == AUTO:
        raise ValueError(f"backend.name: expected a non-empty string other than {AUTO!r}, got {backend.name!r}")
    if backend.platforms is not None and (isinstance(backend.platforms, str) or not backend.platforms):
        raise ValueError(f"backend.platforms: expected a non-empty tuple of platforms or None, got "
                         f"{backend.platforms!r}")
    if replace and backend.name in _BACKENDS:
        unregister(backend.name)
    for n in (backend.name, *backend.aliases):
        if n == AUTO or n in _BACKENDS or n in _ALIASES:
            raise ValueError(f"backend.name: {n!r} is already registered (unregister it first or pass replace=True)")
    _BACKENDS[backend.name] = backend
    for a in backend.aliases:
        _ALIASES[a] = backend.name
    return backend


def unregister(name: str) -> Backend:
    """Removes the backend called ``name`` (or one of its aliases) and returns it."""
    try:
        backend = get(name)
    except ValueError:
        raise ValueError(f"name: no backend {name!r} is registered (registered: {', '.join(names())})") from None
    del _BACKENDS[backend.name]
    for a in backend.aliases:
        _ALIASES.pop(a, None)
    _LOADED.pop(backend.name, None)
    _LOADED_SCALAR.pop(backend.name, None)
    return backend


def names() -> tuple[str, ...]:
    """Canonical names of the registered backends, highest priority first."""
    _ensure_builtins()
    return tuple(sorted(_BACKENDS, key=lambda n: (-_BACKENDS[n].priority, n)))


def choices() -> tuple[str, ...]:
    """Every accepted ``impl`` value: ``"auto"``, the names, then the aliases (for error messages and the CLI)."""
    _ensure_builtins()
    return (AUTO, *names(), *sorted(_ALIASES))


def get(impl: str) -> Backend:
    """The backend called ``impl`` (a name or an alias); otherwise a one-line ValueError listing the choices."""
    _ensure_builtins()
    if isinstance(impl, str):
        name = _ALIASES.get(impl, impl)
        if name in _BACKENDS:
            return _BACKENDS[name]
    raise ValueError(f"impl: expected one of {', '.join(choices())}, got {impl!r}")


def check_impl(impl) -> None:
    """One-line ValueError naming ``impl`` unless it is ``"auto"`` or a registered name or alias."""
    if impl != AUTO:
        get(impl)


def kernel(backend: Backend) -> Callable:
    """The backend's kernel function (``backend.load()`` once, then cached)."""
    fn = _LOADED.get(backend.name)
    if fn is None:
        fn = _LOADED[backend.name] = backend.load()
    return fn


def scalar_kernel(backend: Backend) -> Callable | None:
    """The backend's scalar-gate kernel function (g [B, T, H]; ``backend.load_scalar()`` once, then cached), or
    None when it has none (``gla`` then broadcasts the gate over K and runs ``kernel(backend)``)."""
    if backend.load_scalar is None:
        return None
    fn = _LOADED_SCALAR.get(backend.name)
    if fn is None:
        fn = _LOADED_SCALAR[backend.name] = backend.load_scalar()
    return fn


def _reason(backend: Backend, problem: Problem | None) -> str | None:
    return None if backend.supports is None or problem is None else backend.supports(problem)


def resolve(impl: str, *, platform: str, interpret: bool = False, problem: Problem | None = None) -> Backend:
    """The backend that runs a call with ``impl`` on ``platform`` (a jax platform: "cpu", "gpu", "tpu").

    ``"auto"``: the highest-priority backend that is native to ``platform``, validated and supports ``problem``,
    else ``"chunk"`` (with a one-time warning when an unvalidated native kernel was passed over). A backend named
    explicitly must run on ``platform``, or be a Pallas kernel with ``interpret=True``; ``interpret=True`` with a
    pure-JAX backend or with ``"auto"`` is an error. Every error is a one-line ValueError naming the argument.
    """
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret: expected True or False, got {interpret!r}")
    if impl == AUTO:
        if interpret:
            raise ValueError("interpret: Pallas interpret mode needs a kernel backend named explicitly "
                             "(impl='triton', ...), got impl='auto'")
        _ensure_builtins()
        native = [b for b in _BACKENDS.values() if b.native(platform) and not b.pure_jax]
        native.sort(key=lambda b: (-b.priority, b.name))
        for b in native:
            if b.validated and _reason(b, problem) is None:
                return b
        unvalidated = [b.name for b in native if not b.validated and _reason(b, problem) is None]
        if unvalidated and (platform, unvalidated[0]) not in _WARNED:
            _WARNED.add((platform, unvalidated[0]))
            names = ", ".join(repr(n) for n in unvalidated)
            opt_in = " or ".join(f"impl={n!r}" for n in unvalidated)
            warnings.warn(f"impl='auto' runs {FALLBACK!r} on {platform}: the {names} kernels have not been validated "
                          f"on this hardware; pass {opt_in} to opt in", stacklevel=3)
        return get(FALLBACK)
    backend = get(impl)
    if interpret and backend.pure_jax:
        raise ValueError(f"interpret: only Pallas kernel backends have an interpret mode; impl={impl!r} is pure JAX")
    if not interpret and not backend.runs_on(platform):
        raise ValueError(f"impl: {impl!r} runs on {'/'.join(backend.platforms)}, not {platform}; pass "
                         f"interpret=True to run its kernels in Pallas interpret mode (slow; for tests)")
    reason = _reason(backend, problem)
    if reason:
        raise ValueError(f"impl: {impl!r} cannot run this call: {reason}")
    return backend
