"""The peer watchdog: a hung (SIGSTOP) or dead (SIGKILL) peer ends every process of a two-process job within a
bounded time, with one line naming the peer; finished peers are not reported."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gla_jax.train import config as C
from gla_jax.train import watchdog as W

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 5


class _Store:
    """A key-value store like JAX's coordination service (``fail=True``: it does not answer)."""

    def __init__(self):
        self.kv, self.fail = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.fail:
            raise RuntimeError("UNAVAILABLE: coordination service unreachable")
        assert allow_overwrite or key not in self.kv
        self.kv[key] = value

    def key_value_dir_get(self, directory):
        if self.fail:
            raise RuntimeError("UNAVAILABLE: coordination service unreachable")
        return [(k, v) for k, v in self.kv.items() if k.startswith(directory)]


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _pair(store, clock, n=3):
    return [W.PeerWatchdog(store, i, n, 10, interval_s=1, clock=clock, coordinator="127.0.0.1:1") for i in range(n)]


def test_silent_peer_is_named_after_the_timeout():
    store, clock = _Store(), _Clock()
    a, b, c = _pair(store, clock)
    for step in range(20):  # all beating: nobody is reported, however long it runs
        clock.t += 1
        for w in (a, b, c):
            w.beat_once()
        assert a.silent_peer() is None and b.silent_peer() is None
    for step in range(10):  # process 2 stops: reported only after more than 10 s
        clock.t += 1
        a.beat_once()
        b.beat_once()
        assert a.silent_peer() is None
    clock.t += 1.5
    a.beat_once()
    msg = a.silent_peer()
    assert msg.startswith("distributed.timeout_s: process 2 ") and "ending process 0" in msg and "\n" not in msg


def test_finished_peer_is_not_reported_and_a_dead_store_is():
    store, clock = _Store(), _Clock()
    a, b, c = _pair(store, clock)
    for w in (a, b, c):
        w.beat_once()
    b.finished()
    c.finished()
    a.beat_once()
    clock.t += 100
    assert a.silent_peer() is None  # everyone else finished
    store2, clock2 = _Store(), _Clock()
    a, b, c = _pair(store2, clock2)
    store2.fail = True
    for _ in range(12):
        clock2.t += 1
        with pytest.raises(RuntimeError):
            a.beat_once()
    assert "the coordinator (process 0, 127.0.0.1:1) has not answered" in a.silent_peer()


def test_peer_failure_words_and_config_key():
    assert W.looks_like_peer_failure(ValueError("UNKNOWN: Gloo AllGather failed: Connection reset by peer"))
    assert not W.looks_like_peer_failure(ValueError("model.hidden_size: must be positive"))
    assert C.load_config().distributed.timeout_s == 300
    with pytest.raises(ValueError, match="^distributed.timeout_s"):
        C.load_config(None, ["distributed.timeout_s=-1"])
    with pytest.raises(ValueError, match="^distributed.timeout_s"):
        W.PeerWatchdog(_Store(), 0, 2, 0)


# ------------------------------------------------------------------------------------------------------------
# two real processes on 127.0.0.1 (gloo collectives, JAX's key-value store)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair():
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "watchdog_peer.py"), str(i), str(port),
                               str(TIMEOUT_S)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:  # wait for "ready" (after jax.distributed.initialize and a first collective)
        deadline = time.time() + 240
        while time.time() < deadline:
            line = p.stdout.readline()
            if not line or line.strip() == "ready":
                break
        assert line.strip() == "ready", p.stderr.read()[-2000:] if p.poll() is not None else "not ready"
    time.sleep(1.0)
    return procs


def _wait(p, limit):
    t0 = time.time()
    try:
        rc = p.wait(limit)
    except subprocess.TimeoutExpired:
        rc = None
    return rc, time.time() - t0, p.stderr.read()


def _error_lines(err):
    return [ln for ln in err.splitlines() if ln.startswith("gla-jax train: error:")]


@pytest.mark.parametrize("how", ["SIGSTOP", pytest.param("SIGKILL", marks=pytest.mark.slow)])
def test_hung_or_dead_peer_ends_every_process(how):
    procs = _start_pair()
    try:
        os.kill(procs[1].pid, getattr(signal, how))
        rc, waited, err = _wait(procs[0], TIMEOUT_S + 30)
        assert rc not in (0, None), f"process 0 still running after {waited:.0f} s"
        assert waited < TIMEOUT_S + 15
        assert "Traceback" not in err, err[-2000:]
        lines = _error_lines(err)
        assert len(lines) == 1 and "process 1" in lines[0] and "distributed.timeout_s" in lines[0], err[-2000:]
        if how == "SIGSTOP":  # the stopped one, once it runs again, finds its peer gone and ends too
            os.kill(procs[1].pid, signal.SIGCONT)
            rc1, waited1, err1 = _wait(procs[1], TIMEOUT_S + 30)
            assert rc1 not in (0, None) and waited1 < TIMEOUT_S + 15
            lines = _error_lines(err1)
            assert len(lines) == 1 and "process 0" in lines[0], err1[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
