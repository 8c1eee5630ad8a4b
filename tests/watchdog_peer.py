"""A process of a two-process job for the watchdog tests: initialize through gla_jax (watchdog armed), print
"ready", then run cross-process collectives in a loop (where a hung peer would block it forever).

    python tests/watchdog_peer.py PROCESS_ID PORT TIMEOUT_S
"""

import sys
import time

from gla_jax.train import config as C
from gla_jax.train import distributed


def main(pid: int, port: int, timeout_s: float) -> None:
    cfg = C.load_config(None, [f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
                               f"distributed.process_id={pid}", f"distributed.timeout_s={timeout_s}"])
    distributed.initialize(cfg.distributed)
    from jax.experimental import multihost_utils

    from gla_jax.train import watchdog

    multihost_utils.sync_global_devices("start")
    print("ready", flush=True)

    def work():
        for i in range(1_000_000):
            multihost_utils.sync_global_devices(f"step {i}")  # a collective over both processes
            time.sleep(0.05)

    watchdog.run_guarded(work)  # as the train command runs its loop


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
