"""The one place that touches Mosaic GPU APIs that are private or moved between jax versions.

* Interpret mode: jax 0.10.2 runs Mosaic GPU kernels on the CPU with
  ``jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams`` (not exported yet; later versions move it to
  ``jax._src.pallas.mosaic.interpret.utils`` or export it as ``plgpu.InterpretGPUParams``). ``interpret_class``
  looks in those places only, and ``interpret_params`` fails with one line naming ``interpret`` if none has it.
* ``plgpu.kernel`` names its output and scratch arguments ``out_type``/``scratch_types`` in newer jax and
  ``out_shape``/``scratch_shapes`` in older; ``kernel`` passes whichever the installed jax takes.
"""

from __future__ import annotations

import inspect

from jax.experimental.pallas import mosaic_gpu as plgpu


def interpret_class():
    """The ``InterpretGPUParams`` class, or None when this jax has no Mosaic GPU interpret mode where we look."""
    # public in newer jax; private in 0.10.2 (params) and in some later versions (the shared interpret utils)
    for path in ("jax.experimental.pallas.mosaic_gpu", "jax._src.pallas.mosaic_gpu.interpret.params",
                 "jax._src.pallas.mosaic.interpret.utils"):
        try:
            module = __import__(path, fromlist=["InterpretGPUParams"])
        except ImportError:
            continue
        cls = getattr(module, "InterpretGPUParams", None)
        if cls is not None:
            return cls
    return None


def interpret_params(interpret):
    """``interpret`` -> what ``plgpu.kernel`` takes: None (compile for the GPU) or interpret-mode parameters
    (True: race detection on; an ``InterpretGPUParams`` instance is used as given)."""
    if interpret is False or interpret is None:
        return None
    cls = interpret_class()
    if cls is not None and isinstance(interpret, cls):
        return interpret
    if interpret is True:
        if cls is None:
            import jax

            raise ValueError(f"interpret: this jax ({jax.__version__}) has no Mosaic GPU interpret mode "
                             "(InterpretGPUParams not found); run on a Hopper GPU instead")
        return cls(detect_races=True)
    raise ValueError(f"interpret: expected a bool or InterpretGPUParams, got {interpret!r}")


def races_found() -> bool:
    """Whether any kernel run in interpret mode with race detection saw a data race (private state of the
    interpreter; False when this jax does not expose it)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:
        return False
    races = getattr(gpu_callbacks, "_races", None)
    return bool(getattr(races, "races_found", False))


def reset_interpret_state() -> None:
    """Clears the interpreter's global state (needed after a kernel raised inside interpret mode)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:
        return
    reset = getattr(gpu_callbacks, "reset_gpu_interpret_mode_state", None)
    if reset is not None:
        reset()


_KERNEL_ARGS = set(inspect.signature(plgpu.kernel).parameters)


def kernel(body, *, out, scratch=(), **kw):
    """``plgpu.kernel(body, out_type=out, scratch_types=scratch, **kw)`` under this jax's argument names."""
    out_name = "out_type" if "out_type" in _KERNEL_ARGS else "out_shape"
    scratch_name = "scratch_types" if "scratch_types" in _KERNEL_ARGS else "scratch_shapes"
    args = {out_name: out, **kw}
    if scratch:
        args[scratch_name] = scratch
    return plgpu.kernel(body, **args)
