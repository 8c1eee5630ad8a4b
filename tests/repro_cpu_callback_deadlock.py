"""Minimal reproduction (no Pallas, not collected by pytest) of the deadlock that TPU interpret mode hit inside the
sharded trainer on 8 fake CPU devices (jax/jaxlib 0.10.2, Python 3.11, a 2-core machine):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python tests/repro_cpu_callback_deadlock.py            # hangs (exits 1 after a stack dump at 60 s)
    NPROC=16 XLA_FLAGS=... python tests/repro_cpu_callback_deadlock.py   # prints the sums, exits 0

Each of the 8 devices runs, under ``jax.shard_map``: an ordered ``io_callback``, a ``psum``, then an
``io_callback`` whose operand is 400 KB. ``io_callback`` first ``device_put``s its operands onto a CPU device and
the callback reads them back with ``np.asarray``. The stack dump shows some device threads in
``io_callback_impl``'s ``np.asarray`` (waiting for that copy) and XLA reporting the others stuck in the all-reduce
rendezvous (how many of each varies from run to run). Our reading: the copy needs a thread of XLA's CPU thread pool
(``tf_XLAEigen``), whose threads also run the device programs; the pool has 8 threads here (2 cores, 8 devices;
16 with NPROC=16), all of them blocked. Small operands (64 bytes) do not hang; neither does the psum or the
ordered callback alone. Pallas TPU interpret mode makes the same pattern: its kernels are sequences of
``io_callback``s with cross-device barriers (``threading.Barrier``) and an ordered callback at each kernel's start
and end, and the trainer's step has XLA collectives between kernel calls; every device then waits in the
interpreter's ``_allocate_buffer`` (``np.array`` of a callback operand).

Workaround: ``NPROC`` (read by XLA's ``DefaultThreadPoolSize``) > the device count gives the pool spare threads.
"""

import faulthandler
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(n: int = 100_000) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import io_callback
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("x",))

    def local(x):
        x = io_callback(lambda t: t, jax.ShapeDtypeStruct(x.shape, x.dtype), x, ordered=True)
        x = x + jax.lax.psum(x.sum(), "x")
        return io_callback(lambda t: np.asarray(t).sum(keepdims=True), jax.ShapeDtypeStruct((1,), jnp.float32), x)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    x = jax.device_put(jnp.ones((8 * n,), jnp.float32), NamedSharding(mesh, P("x")))
    got = np.asarray(f(x))
    expected = n * (1.0 + 8 * n)
    print("sums per device:", got, "expected", expected, flush=True)
    sys.exit(0 if np.allclose(got, expected, rtol=1e-6) else 2)


if __name__ == "__main__":
    faulthandler.dump_traceback_later(60, exit=True)
    main()
