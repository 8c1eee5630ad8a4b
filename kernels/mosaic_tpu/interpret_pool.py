"""A warning for TPU interpret mode under a mesh of CPU devices, where XLA's CPU thread pool can be too small.

TPU interpret mode runs each kernel as a chain of ``jax.io_callback``s with cross-device barriers. Each callback
first copies its operands to a CPU device, and that copy waits for a thread of XLA's CPU pool, whose threads also
run the device programs. The pool has max(cores, devices) threads (cores: the ``NPROC`` environment variable when
set, else the CPUs this process may use). With at most as many threads as devices, all of them can block at once
(some devices in the interpreter's barrier or an XLA collective, the rest waiting for their copies): the program
hangs with no error. Setting ``NPROC`` above the device count (twice it is safe) before jax starts gives the pool
spare threads. ``tests/repro_cpu_callback_deadlock.py`` reproduces the hang without Pallas (docs/design.md §7.3).
"""

from __future__ import annotations

import math
import os
import warnings

import jax


def cpu_pool_threads() -> int:
    """The size XLA gives its CPU thread pool before the device count is taken into account: ``NPROC`` if set,
    else the number of CPUs this process may run on."""
    try:
        return int(os.environ["NPROC"])
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def warn_if_cpu_pool_too_small(interpret) -> None:
    """Warns (at trace time) when a kernel in TPU interpret mode is traced under a mesh of more than one CPU device
    and the CPU pool has no thread beyond one per device: the run can then deadlock (see the module docstring)."""
    if not interpret or jax.default_backend() != "cpu":
        return
    mesh = jax.sharding.get_abstract_mesh()
    devices = 1 if mesh is None or mesh.empty else math.prod(dict(mesh.shape).values())
    threads = cpu_pool_threads()
    if devices > 1 and threads <= devices:
        warnings.warn(f"mosaic_tpu interpret mode on a mesh of {devices} CPU devices with {threads} CPU pool "
                      f"threads can deadlock: set NPROC={2 * devices} in the environment before jax starts",
                      RuntimeWarning, stacklevel=3)
