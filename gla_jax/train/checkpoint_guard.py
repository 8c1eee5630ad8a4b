"""Restoring checkpoints safely: verify before trusting, move damaged steps aside, keep orbax's noise away.

``restore_newest_good`` walks a run's checkpoint steps from the newest. For each step it
  1. compares the saved parameter shapes/dtypes with the ones the model expects (orbax's metadata; no array is
     read): a difference means another model, i.e. a user error, never damage -- one ``UserError`` line;
  2. restores it (and runs the caller's ``verify``, e.g. setting the data iterator's state) with orbax's and
     asyncio's logging, stray tracebacks and "Event loop is closed" messages captured;
  3. on failure moves the step aside to ``checkpoints/damaged/<step>-<UTC time>/`` (nothing is deleted; the
     captured error text is saved there as ``restore-error.txt``), prints one line saying so, and tries the
     previous step. The damaged step's number is then free, so the resumed run can save it again.
See docs/design.md §6.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import jax

from gla_jax.errors import UserError

DAMAGED_DIR = "damaged"
_NOISY_LOGGERS = ("absl", "asyncio", "orbax", "jax._src.distributed", "tensorstore")


@contextlib.contextmanager
def captured_noise():
    """Captures what orbax/tensorstore/asyncio print while restoring: log records of their loggers, text written to
    ``sys.stderr``, unraisable exceptions (``Exception ignored in ...``) and exceptions of background threads.
    Yields a ``StringIO`` holding all of it."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    saved = []
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers = [handler]
        lg.propagate = False
    old_stderr, old_unraisable, old_thread_hook = sys.stderr, sys.unraisablehook, threading.excepthook

    def unraisable(u):
        buf.write(f"unraisable in {u.object!r}: {u.exc_type.__name__}: {u.exc_value}\n")

    def thread_hook(a):
        buf.write(f"thread {getattr(a.thread, 'name', '?')}: "
                  + "".join(traceback.format_exception(a.exc_type, a.exc_value, a.exc_traceback)))

    sys.stderr, sys.unraisablehook, threading.excepthook = buf, unraisable, thread_hook
    try:
        yield buf
    finally:
        gc.collect()  # finalizers of failed coroutines run now, inside the capture
        sys.stderr, sys.unraisablehook, threading.excepthook = old_stderr, old_unraisable, old_thread_hook
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate


def first_line(e: BaseException, limit: int = 200) -> str:
    """``"<Type>: <first line of the message>"`` cut to ``limit`` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full TensorStore details")[0]  # the rest is a long repr of the store's spec
    out = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _key_path(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def shape_table(tree) -> dict[str, tuple]:
    """``{"model.layers.0.attn.q_proj.kernel": (shape, dtype name)}`` of a tree of arrays/metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape"):
            out[_key_path(path)] = (tuple(leaf.shape), str(getattr(leaf, "dtype", "")))
    return out


def saved_param_shapes(params_dir: str | Path) -> dict[str, tuple]:
    """The shape table of a saved parameter item (orbax metadata only; raises if it cannot be read)."""
    import orbax.checkpoint as ocp

    with captured_noise():
        ck = ocp.PyTreeCheckpointer()
        try:
            meta = ck.metadata(Path(params_dir).absolute())
        finally:
            ck.close()
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return shape_table(tree)


def shape_differences(saved: dict, expected: dict, limit: int = 3) -> list[str]:
    """Up to ``limit`` lines "name: saved S, expected E" (also parameters only one side has)."""
    out = []
    for key in sorted(set(saved) | set(expected)):
        a, b = saved.get(key), expected.get(key)
        if a != b:
            fa = "missing" if a is None else f"{a[0]} {a[1]}"
            fb = "missing" if b is None else f"{b[0]} {b[1]}"
            out.append(f"{key}: saved {fa}, expected {fb}")
    return out[:limit] + ([f"{len(out) - limit} more"] if len(out) > limit else [])


def check_params_match(params_dir: str | Path, abstract_params, what: str) -> None:
    """UserError (one line, starting with ``what`` when given) if the parameters saved in ``params_dir`` have other names,
    shapes or dtypes than ``abstract_params``. Unreadable metadata raises the underlying error (damage)."""
    diffs = shape_differences(saved_param_shapes(params_dir), shape_table(abstract_params))
    if diffs:
        msg = f"the saved parameters belong to another model ({'; '.join(diffs)})"
        raise UserError(f"{what}: {msg}; the model config must match the one they were saved with" if what else msg)


def move_aside(ckpt_dir: Path, step: int, reason: str) -> Path:
    """Renames ``ckpt_dir/<step>`` to ``ckpt_dir/damaged/<step>-<UTC time>`` and writes ``reason`` there."""
    src = Path(ckpt_dir) / str(step)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = Path(ckpt_dir) / DAMAGED_DIR / f"{step}-{stamp}"
    n = 1
    while dest.exists():
        dest = Path(ckpt_dir) / DAMAGED_DIR / f"{step}-{stamp}-{n}"
        n += 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    try:
        (dest / "restore-error.txt").write_text(reason)
    except OSError:
        pass
    return dest


def _try_step(checkpointer, step, abstract_params, abstract_opt_state, data_keys, verify):
    """``(restored, None)`` or ``(None, (error, details))`` for one step; UserError for another model's step."""
    step_dir = Path(checkpointer.directory) / str(step)
    try:
        check_params_match(step_dir / "params", abstract_params, f"checkpoint {step_dir}")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable metadata: damage
        return None, (e, traceback.format_exc())
    with captured_noise() as noise:
        try:
            restored = (step, *checkpointer.restore(step, abstract_params, abstract_opt_state, data_keys))
            if verify is not None:
                verify(restored)
            return restored, None
        except Exception as e:  # noqa: BLE001 - a damaged step
            failure = (e, traceback.format_exc())
    return None, (failure[0], failure[1] + "\n--- captured output ---\n" + noise.getvalue())


def _agree_on_step(step: int) -> int:
    """The smallest of every process's newest good step (-1: none), so all processes resume from the same one."""
    if jax.process_count() == 1:
        return step
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray([step], np.int64))))


def restore_newest_good(checkpointer, abstract_params, abstract_opt_state, data_keys=(), *, verify=None,
                        log=None, is_main: bool | None = None):
    """``(step, params, opt_state, meta, data_state)`` of the newest checkpoint that restores and passes ``verify``
    (a callable taking that tuple; raising means the step is damaged) on every process, or None when there is none.

    ``checkpointer``: a ``gla_jax.train.checkpoint.Checkpointer``. The processes agree on the step (the oldest of
    their newest good ones); every newer step is moved aside by the main process (``is_main``; default: process 0)
    with one line each through ``log`` (default: print). A step whose parameters have other shapes than
    ``abstract_params`` raises ``UserError`` instead (another model's run)."""
    log = log or (lambda msg: print(msg, flush=True))
    is_main = jax.process_index() == 0 if is_main is None else is_main
    directory = Path(checkpointer.directory)
    steps = checkpointer.all_steps()
    if not steps:  # every process sees the same (empty) folder: nothing to agree on
        return None
    failures, restored = {}, None
    for step in reversed(steps):
        restored, failure = _try_step(checkpointer, step, abstract_params, abstract_opt_state, data_keys, verify)
        if restored is not None:
            break
        failures[step] = failure
    agreed = _agree_on_step(restored[0] if restored is not None else -1)
    if restored is not None and restored[0] != agreed:  # another process could not use this step
        restored = None
        if agreed >= 0:
            restored, failure = _try_step(checkpointer, agreed, abstract_params, abstract_opt_state, data_keys, verify)
            if restored is None:
                raise RuntimeError(f"checkpoint step {agreed} restored on another process but not on this one "
                                   f"({first_line(failure[0])})")
    if is_main:
        for step in (s for s in reversed(steps) if s > agreed):
            err, details = failures.get(step, (RuntimeError("it did not restore on another process"), ""))
            dest = move_aside(directory, step, f"{first_line(err, 2000)}\n\n{details}")
            log(f"warning: checkpoint step {step} is damaged ({first_line(err)}); moved it to {dest} and "
                f"{'resuming from step %d' % agreed if agreed >= 0 else 'starting from scratch'}")
    if any(s > agreed for s in steps):
        _forget_step(checkpointer)
    return restored


def _forget_step(checkpointer) -> None:
    """Makes orbax's manager re-read the step list (the moved step is gone, so saving it again does not collide)."""
    with contextlib.suppress(Exception):
        checkpointer.manager.reload()
