"""A watchdog for multi-process runs: a peer that hangs, stops or dies ends every process within a bounded time.

Without it, a process whose peer stops responding waits in a collective forever (gloo's own deadline only fires
during set-up), burning the whole allocation. Every process runs two daemon threads:

  beat   every ``interval`` seconds writes its heartbeat counter to JAX's distributed key-value store
         (``gla_jax/watchdog/<process id>``, overwritten) and reads all peers' heartbeats in one call;
  check  every second compares the clock with the last time each peer's counter moved, and with the last time the
         store answered at all.

When a peer's counter has not moved for ``timeout_s`` seconds (``distributed.timeout_s``) -- or the store itself
(the coordinator, process 0) has not answered for that long -- the check thread prints one line naming that peer
and ends the process with ``os._exit(EXIT_CODE)``: the main thread may be blocked in a collective that no Python
exception can interrupt. A process that finished its work marks its key ``done`` (``finished()``), after which its
peers stop watching it. The threads only touch the store and the clock, so they keep beating while the main thread
computes, compiles or saves a checkpoint (all of which release the GIL). See docs/design.md §6.
"""

from __future__ import annotations

import os
import sys
import threading
import time

KEY_DIR = "gla_jax/watchdog/"
DONE = "done"
EXIT_CODE = 1


def _kv_client():
    """JAX's distributed runtime client (has ``key_value_set``/``key_value_dir_get``), or None if not initialized."""
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None


class PeerWatchdog:
    """Heartbeats through a key-value store; ends this process when a peer falls silent for ``timeout_s`` seconds.

    ``client``: an object with ``key_value_set(key, value, allow_overwrite=True)`` and ``key_value_dir_get(dir)`` ->
    ``[(key, value), ...]`` (JAX's ``DistributedRuntimeClient``). ``on_timeout(message)`` defaults to printing the
    message to stderr and ``os._exit(EXIT_CODE)``."""

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float, *, interval_s: float | None = None,
                 coordinator: str = "", on_timeout=None, clock=time.monotonic):
        if timeout_s <= 0:
            raise ValueError(f"distributed.timeout_s: must be > 0 to watch peers, got {timeout_s}")
        self.client = client
        self.pid = process_id
        self.peers = [p for p in range(num_processes) if p != process_id]
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s if interval_s is not None else max(0.2, min(10.0, self.timeout_s / 5))
        self.coordinator = coordinator
        self.on_timeout = on_timeout or _exit_with
        self.clock = clock
        now = clock()
        self.last_value = {p: None for p in self.peers}
        self.last_seen = {p: now for p in self.peers}
        self.last_answer = now
        self.done_peers: set[int] = set()
        self._stop = threading.Event()
        self._count = 0
        self._threads: list[threading.Thread] = []

    # -- the two threads ------------------------------------------------------------------------------------------

    def beat_once(self) -> None:
        """Writes this process's next heartbeat and reads the peers' (one store round trip each)."""
        self._count += 1
        self.client.key_value_set(f"{KEY_DIR}{self.pid}", str(self._count), allow_overwrite=True)
        entries = self.client.key_value_dir_get(KEY_DIR)
        now = self.clock()
        self.last_answer = now
        for key, value in entries:
            try:
                peer = int(str(key).rstrip("/").rsplit("/", 1)[-1])
            except ValueError:
                continue
            if peer not in self.last_value:
                continue
            if value == DONE:
                self.done_peers.add(peer)
            elif value != self.last_value[peer]:
                self.last_value[peer] = value
                self.last_seen[peer] = now

    def silent_peer(self) -> str | None:
        """The message for the first peer (or coordinator) silent for longer than ``timeout_s``; None if all is well."""
        now = self.clock()
        watched = [p for p in self.peers if p not in self.done_peers]
        if not watched:
            return None
        if now - self.last_answer > self.timeout_s:
            return (f"distributed.timeout_s: the coordinator (process 0{', ' + self.coordinator if self.coordinator else ''}) "
                    f"has not answered for {now - self.last_answer:.0f} s (hung, stopped or dead); "
                    f"ending process {self.pid}")
        for p in watched:
            if now - self.last_seen[p] > self.timeout_s:
                return (f"distributed.timeout_s: process {p} has sent no heartbeat for {now - self.last_seen[p]:.0f} s "
                        f"(hung, stopped or dead); ending process {self.pid} of {len(self.peers) + 1}")
        return None

    def _beat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat_once()
            except Exception:  # noqa: BLE001 - the store is unreachable: the check thread times it out
                pass
            self._stop.wait(self.interval_s)

    def _check_loop(self) -> None:
        while not self._stop.wait(min(1.0, self.interval_s)):
            msg = self.silent_peer()
            if msg is not None and not self._stop.is_set():
                self.on_timeout(msg)
                return

    # -- life cycle -------------------------------------------------------------------------------------------------

    def start(self) -> "PeerWatchdog":
        for name, fn in (("gla-jax-heartbeat", self._beat_loop), ("gla-jax-watchdog", self._check_loop)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def finished(self) -> None:
        """This process completed its work: tell the peers (they stop watching it) and stop both threads."""
        self._stop.set()
        try:
            self.client.key_value_set(f"{KEY_DIR}{self.pid}", DONE, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may already be gone at the very end
            pass


def _exit_with(message: str) -> None:
    print(f"gla-jax train: error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


_active: PeerWatchdog | None = None


def start(timeout_s: float, *, coordinator: str = "") -> PeerWatchdog | None:
    """Starts the watchdog of this process (after ``jax.distributed.initialize``); None for one process or when
    ``timeout_s`` is 0 (off)."""
    global _active
    import jax

    if timeout_s <= 0 or jax.process_count() < 2:
        return None
    client = _kv_client()
    if client is None:
        return None
    _active = PeerWatchdog(client, jax.process_index(), jax.process_count(), timeout_s,
                           coordinator=coordinator).start()
    return _active


# words in the errors a collective raises when a peer's connection breaks (gloo, NCCL, the coordination service)
_PEER_FAILURE_WORDS = ("gloo", "nccl", "connection reset", "connection refused", "broken pipe", "deadline_exceeded",
                       "unavailable", "coordination", "heartbeat", "peer")


def looks_like_peer_failure(e: BaseException) -> bool:
    """True if the exception's text points at a lost peer rather than a mistake of this process."""
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in _PEER_FAILURE_WORDS)


def explain_failure(e: BaseException, *, poll_s: float = 0.2) -> None:
    """Called with an exception that ended this process's work in a multi-process run. If it looks like a lost
    peer, waits (at most ``timeout_s`` plus two heartbeat intervals) for the watchdog to name the silent peer in
    one line and end the process; returns (so the caller re-raises) when no peer fell silent or no watchdog runs."""
    wd = _active
    if wd is None or not looks_like_peer_failure(e):
        return
    deadline = time.monotonic() + wd.timeout_s + 2 * wd.interval_s + 1.0
    while time.monotonic() < deadline and not wd._stop.is_set():
        time.sleep(poll_s)  # the check thread ends the process from here on if a peer is silent


def run_guarded(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; an exception from a lost peer becomes the watchdog's one line (``explain_failure``)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        explain_failure(e)
        raise


def finished() -> None:
    """Marks this process done (no-op without a running watchdog)."""
    global _active
    if _active is not None:
        _active.finished()
        _active = None
