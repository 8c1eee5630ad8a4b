"""Shared helpers for the experiment scripts: command-line flags, run metadata, results (JSON + PNG), tables, and
language-model runs through the library's trainer (``gla_jax.train``, the code ``gla-jax train``/``eval`` run).
Training itself (loss, step, optimizer, loop) is the library's; nothing here defines its own.

Every experiment writes ``experiments/results/<name>.json`` with the keys ``experiment``, ``config``, ``seed``,
``env`` (package versions, device, platform, git commit), ``started``/``finished`` (UTC) and ``results`` (a list
of row dicts), and one or more PNG plots next to it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENTS_DIR.parent
RESULTS_DIR = EXPERIMENTS_DIR / "results"

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "matplotlib", "torch",
            "flash-linear-attention", "triton", "gla-jax")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None when a package is not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The repository's HEAD commit, with "+dirty" when tracked files differ from it; None outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


#: HEAD when this module was first imported, i.e. when the experiment started: a result names the code that produced
#: it even if the checkout moves during a long run.
START_COMMIT = git_commit()


def device_info() -> dict[str, Any]:
    """The JAX backend and devices this process runs on."""
    import jax

    devs = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_count": len(devs),
        "device_kind": devs[0].device_kind if devs else None,
        "process_count": jax.process_count(),
        "cpu_count": os.cpu_count(),
    }


def env_info() -> dict[str, Any]:
    """Everything needed to say where a result came from: versions, device, platform, commit (at the start), command
    line."""
    return {
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_info(),
        "git_commit": START_COMMIT,
        "argv": [pathlib.Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else [],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every experiment has: ``--out`` (results folder), ``--seed``, ``--smoke`` (seconds-long check run)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="folder for the JSON and PNG results")
    p.add_argument("--seed", type=int, default=0, help="random seed (data and initialisation)")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of the whole pipeline (tests, CI)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--replace", action="store_true",
                   help="overwrite an existing results file of the same name (otherwise the run refuses to start)")
    return p


def refuse_overwrite(out_dir: pathlib.Path | str, name: str, replace: bool) -> None:
    """A one-line error before an experiment starts when ``<out_dir>/<name>.json`` exists and ``replace`` is off
    (committed results are changed on purpose only: pass ``--replace`` or another ``--name``)."""
    path = pathlib.Path(out_dir) / f"{name}.json"
    if path.exists() and not replace:
        raise SystemExit(f"error: --name: {path} exists; pass another --name, or --replace to overwrite it")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, pathlib.Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:  # numpy / jax scalars
        return _jsonable(x.item())
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    return x


def repo_relative(value):
    """``value`` with an absolute path inside this repository rewritten relative to the repository root (results
    must not name the machine they ran on); anything else unchanged."""
    if isinstance(value, (str, pathlib.PurePath)):
        path = pathlib.Path(value)
        if path.is_absolute():
            try:
                return str(path.resolve().relative_to(REPO_ROOT.resolve()))
            except ValueError:
                return str(value)
    return value


def write_results(name: str, *, config: dict, seed: int, results: list[dict], out_dir: pathlib.Path | str,
                  started: str | None = None, extra: dict | None = None, replace: bool = False) -> pathlib.Path:
    """Writes ``<out_dir>/<name>.json`` (experiment, config, seed, env, started, finished, results[, extra]);
    FileExistsError if it exists and ``replace`` is off (committed results are never overwritten by accident)."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name: expected a plain file stem, got {name!r}")
    if not isinstance(results, list):
        raise ValueError(f"results: expected a list of row dicts, got {type(results).__name__}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "experiment": name,
        "config": {k: repo_relative(v) for k, v in config.items()},
        "seed": seed,
        "env": env_info(),
        "started": started or utc_now(),
        "finished": utc_now(),
        "results": results,
    }
    if extra:
        doc.update(extra)
    path = out_dir / f"{name}.json"
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists; write under another name or pass replace=True")
    path.write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n")
    return path


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
    """A plain-text (Markdown) table of ``rows`` (dicts) over ``columns`` (default: keys of the first row)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt) if math.isfinite(v) else str(v)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])


def save_figure(fig, out_dir: pathlib.Path | str, name: str) -> pathlib.Path:
    """Saves a matplotlib figure as ``<out_dir>/<name>.png`` and closes it."""
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (scripts run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------------------------------
# Language-model training and evaluation with the library's own loop (gla_jax.train): the same code path as
# ``gla-jax train`` / ``gla-jax eval``.


def library_train(workdir, overrides: dict, *, log: Callable[[str], None] | None = None):
    """Trains with ``gla_jax.train.trainer.Trainer`` from the default config plus dotted ``overrides``
    (e.g. ``{"model.gate": "scalar", "train.steps": 300}``) in ``workdir``. Returns (summary dict of
    ``Trainer.run()``, the Trainer, the resolved config). The run's ``metrics.jsonl`` and checkpoints stay in
    ``workdir``."""
    from gla_jax.train import config as config_lib
    from gla_jax.train import trainer as trainer_lib

    cfg = config_lib.load_config(None, [(k, v) for k, v in overrides.items()])
    trainer = trainer_lib.Trainer(cfg, workdir, log=log or (lambda _: None))
    trainer_lib.save_resolved_config(cfg, workdir, trainer.mcfg)
    summary = trainer.run()
    return summary, trainer, cfg


def run_overrides(args, *, seq_len: int, eval_batches: int = 0, checkpoint: bool = False) -> dict:
    """The non-model dotted overrides every language-model experiment trains with (data, optimizer, loop,
    checkpoint, mesh) from its flags: ``args.source/tokenizer/batch/val_fraction/seed/lr/weight_decay/steps/dtype/
    mesh_data``. Rows of ``seq_len`` tokens; warmup min(steps/10, 100); with ``eval_batches`` the trainer's held-out
    loss at the end (``summary["eval_loss"]``); with ``checkpoint`` one checkpoint at the last step (for
    :func:`library_eval`)."""
    ov = {
        "data.source": args.source, "data.tokenizer": args.tokenizer, "data.seq_len": seq_len,
        "data.batch_size": args.batch, "data.val_fraction": args.val_fraction, "data.shuffle_seed": args.seed,
        "optim.lr": args.lr, "optim.weight_decay": args.weight_decay,
        "optim.warmup_steps": max(1, min(args.steps // 10, 100)),
        "train.steps": args.steps, "train.seed": args.seed, "train.log_every": max(1, args.steps // 50),
        "train.eval_every": args.steps if eval_batches else 0, "train.progress": False,
        "train.compute_dtype": args.dtype, "checkpoint.enabled": bool(checkpoint), "mesh.data": args.mesh_data,
    }
    if eval_batches:
        ov["train.eval_batches"] = eval_batches
    if checkpoint:
        ov.update({"checkpoint.every": args.steps, "checkpoint.async_save": False})
    return ov


def add_run_flags(p: argparse.ArgumentParser, *, batch: int, steps: int, lr: float = 3e-3) -> None:
    """The flags :func:`run_overrides` reads (data, optimizer, steps, dtype, mesh), with an experiment's defaults."""
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--source", default="stdlib", help="data.source of the library's pipeline")
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--vocab", type=int, default=BYTE_VOCAB)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--mesh-data", type=int, default=1, help="mesh.data of the training config (-1: all devices)")


def library_eval(workdir, *, seq_len: int, batches: int, batch_size: int, overrides: Sequence[str] = ()):
    """``gla-jax eval`` as a function: held-out loss and per-position-bucket perplexity of the run in ``workdir``
    (see ``gla_jax.train.evaluate.evaluate_run``)."""
    from gla_jax.train.evaluate import evaluate_run

    return evaluate_run(workdir, seq_len=seq_len, batches=batches, batch_size=batch_size,
                        overrides=list(overrides))


def final_train_loss(losses: dict, fraction: float = 0.1) -> float:
    """Mean training loss over the last ``fraction`` of steps (``losses``: step -> loss)."""
    steps = sorted(losses)
    if not steps:
        raise ValueError("losses: empty")
    tail = steps[-max(1, int(round(len(steps) * fraction))):]
    return float(sum(losses[s] for s in tail) / len(tail))


BYTE_VOCAB = 320  # the byte tokenizer's 257 ids padded to a multiple of 64 (as the training default does)


def memory_estimate(compiled) -> dict[str, int | None]:
    """XLA's buffer sizes of a compiled computation: arguments, outputs, temporaries, and their sum less aliased
    (donated) buffers as an estimate of peak memory. Values are None where the backend does not report them."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not implemented on some backends)
        ma = None
    if ma is None:
        return {"argument_bytes": None, "output_bytes": None, "temp_bytes": None, "peak_estimate_bytes": None}
    get = lambda name: int(getattr(ma, name, 0) or 0)
    arg, out, tmp, alias = (get("argument_size_in_bytes"), get("output_size_in_bytes"), get("temp_size_in_bytes"),
                            get("alias_size_in_bytes"))
    return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": tmp, "peak_estimate_bytes": arg + out + tmp - alias}


def timer():
    """A ``perf_counter``-based stopwatch: ``t = timer(); ...; t()`` returns elapsed seconds."""
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def median_seconds(fn, args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` (blocked until ready) over ``repeats`` calls after one compile-and-warm-up
    call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_bench_results(name: str, args, rows: list[dict], started: str) -> None:
    """Writes a micro-benchmark's ``rows`` as ``name`` (its command-line arguments as the config, with the note
    that CPU timings on a shared machine are noisy) and says where; nothing with ``--smoke``."""
    if args.smoke:
        return
    cfg = {k: v for k, v in vars(args).items() if k not in ("smoke", "no_plot", "replace")}
    cfg["note"] = "CPU timings on a machine shared with other jobs: noisy, compare within this run only"
    path = write_results(name, config=cfg, seed=args.seed, results=rows, out_dir=args.out, started=started)
    print(f"wrote {path}")
