"""The training loop: steps, and hooks that observe them (docs/design.md §6).

Everything a run does besides stepping (logging, evaluation, checkpoints, the stop flag, profiling: see ``hooks.py``)
is a hook ``fn(info: StepInfo)`` registered with ``add_hook(fn, every=N)``; it runs after every N-th step and after
the final one. A ``stop()`` callable (the signal flag) ends the run early after the step it is seen at. The next
batch is fetched before the hooks run, so the host's data work overlaps the device's step.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step. ``state`` is the step function's state (e.g. ``(params, opt_state)``),
    ``metrics`` its device metrics (not waited for), ``started`` the step's ``time.perf_counter()`` start,
    ``data_state`` the data iterator's state from which the next step's batch is read (None if the iterator has no
    ``get_state``); ``final``: the run ends after this step; ``stop``: why, when it ends early."""
    step: int
    state: Any
    metrics: dict
    started: float
    data_state: Any = None
    final: bool = False
    stop: str | None = None


class Loop:
    """``Loop(step_fn).add_hook(fn, every=N).run(state, batches, start, end)``.

    ``step_fn(state, batch) -> (state, metrics)``; ``batches`` an iterator of batches."""

    def __init__(self, step_fn: Callable):
        self.step_fn = step_fn
        self.hooks: list[tuple[Callable[[StepInfo], None], int]] = []

    def add_hook(self, fn: Callable[[StepInfo], None], *, every: int = 1) -> "Loop":
        """Run ``fn(info)`` after each step divisible by ``every`` (>= 1), and once after the final step (the last
        one, or the one after which ``stop()`` asked to end) if it has not run for that step already."""
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        self.hooks.append((fn, every))
        return self

    def run(self, state, batches: Iterator, start: int, end: int,
            stop: Callable[[], str | None] = lambda: None) -> tuple[Any, int, str | None]:
        """Steps ``start+1 .. end``, or up to the step after which ``stop()`` returns a reason; returns
        (state, last step run, the stop reason or None)."""
        step, reason = start, None
        batch = next(batches) if step < end else None
        while step < end and reason is None:
            t0 = time.perf_counter()
            state, metrics = self.step_fn(state, batch)
            step += 1
            data_state = batches.get_state() if hasattr(batches, "get_state") else None
            batch = next(batches) if step < end else None  # host work overlapping the device's step
            info = StepInfo(step, state, metrics, t0, data_state, final=step == end)
            done = set()
            for _ in range(2):  # the second round only when stop() asks, for the hooks not yet run at this step
                for i, (fn, every) in enumerate(self.hooks):
                    if i not in done and (step % every == 0 or info.final):
                        fn(info)
                        done.add(i)
                reason = stop()
                if info.final or reason is None:
                    break
                info.final, info.stop = True, reason
        return state, step, reason
