"""Hooks for ``loop.Loop``: what a run does around its steps (docs/design.md §6).

Each is a small callable ``hook(info: StepInfo)``; the trainer registers them with ``add_hook(hook, every=N)`` in
this order: ``Meter`` (every step: reads the loss, stops on a non-finite one, feeds the progress bar), ``LogHook``
(``train.log_every``), ``EvalHook`` (``train.eval_every``), ``CheckpointHook`` (``checkpoint.every``, and at the
end or on a signal), ``ProfileHook`` (``train.profile``). ``StopFlag`` turns SIGTERM/SIGINT into the loop's
``stop()``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from typing import Callable

import jax


class TrainingError(RuntimeError):
    """The run stopped (non-finite loss); the message says why and which checkpoint is kept."""


class StopFlag:
    """SIGTERM/SIGINT set a flag that the loop reads after each step (``flag()`` -> the signal's name or None); a
    second SIGINT interrupts at once. Install it with ``with flag.installed():`` (a no-op off the main thread)."""

    def __init__(self):
        self.signame = None

    def __call__(self) -> str | None:
        return self.signame

    def _handler(self, signum, frame):
        if self.signame is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, self._handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class Meter:
    """Every step: the loss and gradient norm as floats (``losses[step]``), a TrainingError on a non-finite one
    (``kept()`` says which checkpoint survives), the progress bar, and the sums ``LogHook`` reports per interval."""

    def __init__(self, tokens_per_step: int, progress, kept: Callable[[], str]):
        self.tokens_per_step, self.progress, self.kept = tokens_per_step, progress, kept
        self.losses: dict[int, float] = {}
        self.reset()

    def reset(self):
        self.seconds, self.steps, self.loss_sum = 0.0, 0, 0.0

    def __call__(self, info):
        loss, gnorm = float(info.metrics["loss"]), float(info.metrics["grad_norm"])
        self.losses[info.step] = loss
        self.last = {"loss": loss, "grad_norm": gnorm}
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", gnorm)
            raise TrainingError(f"non-finite {what} ({value}) at step {info.step}; stopping without saving this "
                                f"state; {self.kept()}")
        seconds = time.perf_counter() - info.started  # the step, the next batch, and waiting for the loss
        self.seconds += seconds
        self.steps += 1
        self.loss_sum += loss
        self.progress.update(1, loss=f"{loss:.3f}", tok_s=f"{self.tokens_per_step / max(seconds, 1e-9):.0f}")


class LogHook:
    """One ``metrics.jsonl``/TensorBoard record and one printed line per logging interval: the step's loss, the
    interval's mean loss, learning rate, gradient norm, tokens/s over the time spent in steps, MFU if the peak is
    known."""

    def __init__(self, meter: Meter, writer, progress, *, schedule, total_steps: int, flops_per_token: float,
                 peak_flops: float | None, tokens_seen: Callable[[int], int], t_start: float):
        self.meter, self.writer, self.progress, self.schedule = meter, writer, progress, schedule
        self.total_steps, self.flops_per_token, self.peak = total_steps, flops_per_token, peak_flops
        self.tokens_seen, self.t_start = tokens_seen, t_start

    def __call__(self, info):
        m = self.meter
        if not m.steps:
            return
        tps = m.steps * m.tokens_per_step / max(m.seconds, 1e-9)
        record = {**m.last, "loss_avg": m.loss_sum / m.steps, "lr": float(self.schedule(info.step - 1)),
                  "tokens_per_sec": tps, "mfu": tps * self.flops_per_token / self.peak if self.peak else None,
                  "tokens": self.tokens_seen(info.step), "elapsed": time.time() - self.t_start}
        m.reset()
        self.writer.write(info.step, record)
        line = (f"step {info.step:>6}/{self.total_steps}  loss {record['loss']:.4f} (mean {record['loss_avg']:.4f})  "
                f"lr {record['lr']:.2e}  grad_norm {record['grad_norm']:.3f}  tokens/s {tps:.0f}")
        if record["mfu"] is not None:
            line += f"  mfu {100 * record['mfu']:.1f}%"
        self.progress.write(line)


class EvalHook:
    """Held-out loss every ``train.eval_every`` steps and at the last step (not when stopping on a signal): writes
    ``eval_loss``/``eval_ppl`` to the metrics and prints them; ``last`` holds the newest value."""

    def __init__(self, evaluate: Callable[[object], float | None], writer, progress):
        self.evaluate, self.writer, self.progress = evaluate, writer, progress
        self.last = None

    def __call__(self, info):
        if info.stop:
            return
        loss = self.evaluate(info.state[0])
        if loss is None:
            return
        self.last = loss
        self.writer.write(info.step, {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))})
        self.progress.write(f"step {info.step:>6}  eval_loss {loss:.4f}  eval_ppl {math.exp(min(loss, 50.0)):.3f}")


class CheckpointHook:
    """Saves ``(params, opt_state)``, the metadata ``meta(step)`` and the data state every ``checkpoint.every``
    steps, at the last step and when stopping on a signal (saying so); ``last_saved`` is the newest step saved."""

    def __init__(self, checkpointer, meta: Callable[[int], dict], log, last_saved: int | None):
        self.checkpointer, self.meta, self.log, self.last_saved = checkpointer, meta, log, last_saved

    def __call__(self, info):
        if info.stop:
            self.log(f"received {info.stop}: saving a checkpoint at step {info.step} and stopping")
        if self.last_saved == info.step:
            return
        params, opt_state = info.state
        self.checkpointer.save(info.step, params, opt_state, self.meta(info.step), info.data_state)
        self.last_saved = info.step


class ProfileHook:
    """A ``jax.profiler`` trace of steps ``start+1 .. stop`` into ``logdir`` (view with TensorBoard or Perfetto);
    register with ``every=1``."""

    def __init__(self, logdir, start: int, stop: int, log):
        self.logdir, self.start, self.stop, self.log = str(logdir), start, stop, log
        self.active = False

    def __call__(self, info):
        if info.step == self.start and not info.final:
            jax.profiler.start_trace(self.logdir)
            self.active = True
        elif self.active and (info.step >= self.stop or info.final):
            jax.block_until_ready(info.metrics)
            jax.profiler.stop_trace()
            self.active = False
            self.log(f"profile of steps {self.start + 1}..{info.step} written to {self.logdir}")
