"""Multi-process start-up: ``jax.distributed.initialize`` from the config or the environment.

``distributed.mode``:
  "off"  never initialize (one process);
  "on"   always initialize (arguments from the config, else JAX's cluster auto-detection: SLURM, Open MPI,
         Kubernetes/GKE, Cloud TPU);
  "auto" initialize when the config names a coordinator, when ``JAX_COORDINATOR_ADDRESS`` is set, or when a
         multi-task SLURM job or Open MPI launch is detected.
Environment fallbacks: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. On CPU, collectives
across processes use gloo. ``distributed.timeout_s`` bounds start-up and shutdown and arms the peer watchdog
(``watchdog``): a peer silent that long ends every process with one line naming it.
"""

from __future__ import annotations

import os

from gla_jax.errors import UserError

_initialized = False


def _cluster_detected() -> bool:
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return False


def initialize(dist_cfg) -> bool:
    """Initializes ``jax.distributed`` when the config/environment asks for it; True if it did (or had)."""
    global _initialized
    if _initialized:
        return True
    import jax

    env = os.environ
    coordinator = dist_cfg.coordinator or env.get("JAX_COORDINATOR_ADDRESS", "")
    num = dist_cfg.num_processes or int(env.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1") or -1)
    if dist_cfg.mode == "off":
        return False
    if dist_cfg.mode == "auto" and not (coordinator or _cluster_detected()):
        return False
    if coordinator and (num <= 0 or pid < 0):
        raise UserError("distributed.coordinator: also set distributed.num_processes and distributed.process_id "
                         "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    kwargs = {}
    if coordinator:
        kwargs = dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
    if dist_cfg.local_device_ids:
        kwargs["local_device_ids"] = [int(x) for x in dist_cfg.local_device_ids.split(",") if x.strip()]
    platforms = env.get("JAX_PLATFORMS", "")
    if "cpu" in platforms or not platforms:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # noqa: BLE001 - older/newer jax without the option
            pass
    if dist_cfg.timeout_s > 0:  # bound start-up and shutdown waits by the same timeout as the watchdog
        kwargs["initialization_timeout"] = kwargs["shutdown_timeout_seconds"] = max(1, int(dist_cfg.timeout_s))
    jax.distributed.initialize(**kwargs)
    _initialized = True
    from gla_jax.train import watchdog

    watchdog.start(dist_cfg.timeout_s, coordinator=coordinator)  # a hung or dead peer ends every process
    return True
