"""Shared helpers for the experiment scripts: command-line flags, run metadata, results (JSON + PNG), tables,
and a small optax/NNX training loop for tasks whose loss is not plain next-token prediction (MQAR).

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
    return p


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
                  started: str | None = None, extra: dict | None = None) -> pathlib.Path:
    """Writes ``<out_dir>/<name>.json`` (experiment, config, seed, env, started, finished, results[, extra])."""
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
# Training: a small NNX + optax loop with an optional per-position loss mask.


def count_params(model) -> int:
    """Number of trainable parameters of an NNX module."""
    import jax
    from flax import nnx

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def make_optimizer(lr: float, steps: int, *, warmup: int | None = None, weight_decay: float = 0.1,
                   b2: float = 0.95, clip: float = 1.0, min_lr_ratio: float = 0.1):
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio * lr`` and global-norm clipping (the paper's
    recipe, at a small scale)."""
    import optax

    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    warmup = max(1, min(steps // 10, 100)) if warmup is None else warmup
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=max(1, min(warmup, steps - 1)) if steps > 1 else 1,
                                               decay_steps=max(steps, 2), end_value=lr * min_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, b1=0.9, b2=b2, weight_decay=weight_decay))


def masked_xent(logits, labels, mask):
    """Mean cross-entropy over positions where ``mask`` is true, and the accuracy there.

    logits: [B, T, V] (any float dtype; computed in float32), labels: [B, T] int, mask: [B, T] bool/float.
    """
    import jax.numpy as jnp
    import optax

    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    denom = jnp.maximum(mask.sum(), 1.0)
    loss = (losses * mask).sum() / denom
    acc = ((jnp.argmax(logits, -1) == labels) * mask).sum() / denom
    return loss, acc


def train_model(model, batches: Callable[[int], tuple], *, steps: int, lr: float, weight_decay: float = 0.1,
                log_every: int = 0, log: Callable[[str], None] = print, warmup: int | None = None):
    """Trains ``model`` (NNX, ``model(input_ids, segment_ids=None) -> logits``) in place for ``steps`` AdamW steps.

    ``batches(step)`` returns ``(input_ids [B, T] int32, labels [B, T] int32, mask [B, T])`` or the same plus
    ``segment_ids [B, T]`` (packed documents); the loss is the cross-entropy at positions where ``mask`` is true.
    Returns a history list of dicts ``{step, loss, acc, tokens_per_sec}`` (every ``log_every`` steps, or every
    ``steps // 20`` when 0, and the last step) and the elapsed seconds (compilation included).
    """
    import jax
    import numpy as np
    from flax import nnx

    tx = make_optimizer(lr, steps, warmup=warmup, weight_decay=weight_decay)
    opt = _nnx_optimizer(model, tx)

    @nnx.jit
    def step_fn(model, opt, x, y, m, seg):
        def loss_fn(model):
            logits = model(x) if seg is None else model(x, segment_ids=seg)
            return masked_xent(logits, y, m)

        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        _opt_update(opt, model, grads)
        return loss, acc

    history = []
    t0 = time.perf_counter()
    t_last, tok = t0, 0
    every = log_every or max(1, steps // 20)
    for s in range(steps):
        batch = batches(s)
        x, y, m = batch[:3]
        seg = batch[3] if len(batch) > 3 else None
        loss, acc = step_fn(model, opt, x, y, m, seg)
        tok += int(np.prod(np.shape(x)))
        if (s + 1) % every == 0 or s == steps - 1:
            loss = float(jax.device_get(loss))
            now = time.perf_counter()
            rec = {"step": s + 1, "loss": loss, "acc": float(acc), "tokens_per_sec": tok / max(now - t_last, 1e-9)}
            history.append(rec)
            t_last, tok = now, 0
            if log_every:
                log(f"  step {s + 1:5d}  loss {loss:.4f}  acc {rec['acc']:.3f}  {rec['tokens_per_sec']:.0f} tok/s")
    return history, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# Language-model training and evaluation with the library's own loop (gla_jax.train): the same code path as
# ``gla-jax train`` / ``gla-jax eval``.


def library_train(workdir, overrides: dict, *, log: Callable[[str], None] | None = None):
    """Trains with ``gla_jax.train.loop.Trainer`` from the default config plus dotted ``overrides``
    (e.g. ``{"model.gate": "scalar", "train.steps": 300}``) in ``workdir``. Returns (summary dict of
    ``Trainer.run()``, the Trainer, the resolved config). The run's ``metrics.jsonl`` and checkpoints stay in
    ``workdir``."""
    from gla_jax.train import config as config_lib
    from gla_jax.train import loop

    cfg = config_lib.load_config(None, [(k, v) for k, v in overrides.items()])
    loop.save_resolved_config(cfg, workdir)
    trainer = loop.Trainer(cfg, workdir, log=log or (lambda _: None))
    summary = trainer.run()
    return summary, trainer, cfg


def library_eval(workdir, *, seq_len: int, batches: int, batch_size: int, overrides: Sequence[str] = ()):
    """``gla-jax eval`` as a function: held-out loss and per-position-bucket perplexity of the run in ``workdir``
    (see ``gla_jax.train.evaluate.evaluate_run``)."""
    from gla_jax.train.evaluate import evaluate_run

    return evaluate_run(workdir, seq_len=seq_len, batches=batches, batch_size=batch_size,
                        overrides=list(overrides), log=lambda _: None)


def final_train_loss(losses: dict, fraction: float = 0.1) -> float:
    """Mean training loss over the last ``fraction`` of steps (``losses``: step -> loss)."""
    steps = sorted(losses)
    if not steps:
        raise ValueError("losses: empty")
    tail = steps[-max(1, int(round(len(steps) * fraction))):]
    return float(sum(losses[s] for s in tail) / len(tail))


# ----------------------------------------------------------------------------------------------------------------
# Language-model data: the library's grain pipeline over the embedded corpus (the Python standard library's sources,
# byte tokens).

BYTE_VOCAB = 320  # the byte tokenizer's 257 ids padded to a multiple of 64 (as the training default does)


def lm_sources(source: str = "stdlib", val_fraction: float = 0.02, tokenizer: str = "byte"):
    """(train, held-out) document sources of the library's data pipeline, and the tokenizer."""
    from gla_jax.train.config import DataSection
    from gla_jax.train.data import list_documents
    from gla_jax.train.tokenizer import get_tokenizer

    tok = get_tokenizer(tokenizer)
    data = DataSection(source=source, val_fraction=val_fraction, tokenizer=tokenizer)
    train, val = list_documents(data, tok)
    return train, val, tok


def lm_batches(source, *, seq_len: int, batch_size: int, seed: int = 0):
    """``batches(step) -> (inputs, labels, mask, segment_ids)`` over packed rows of ``source`` (shuffled, repeated;
    the library's grain pipeline). ``labels`` are the next tokens; ``mask`` drops document ends."""
    import jax.numpy as jnp
    import numpy as np

    from gla_jax.train.config import DataSection
    from gla_jax.train.data import loss_mask, make_batches

    it = make_batches(DataSection(seq_len=seq_len, batch_size=batch_size, shuffle_seed=seed, num_shards=1), source)

    def batches(step):
        b = next(it)
        tokens, seg = b["tokens"], b["segment_ids"]
        labels = np.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
        return (jnp.asarray(tokens), jnp.asarray(labels), jnp.asarray(loss_mask(seg) > 0), jnp.asarray(seg))

    return batches


def eval_windows(source, length: int, max_windows: int, min_doc: int | None = None):
    """Non-overlapping windows of ``length + 1`` tokens from the documents of ``source`` that are long enough
    (each window a fresh context). Returns (inputs [N, length], labels [N, length]) int32 numpy, N <= max_windows."""
    import numpy as np

    rows = []
    for i in range(len(source)):
        doc = np.asarray(source[i])
        if len(doc) < max(length + 1, min_doc or 0):
            continue
        for start in range(0, len(doc) - length, length + 1):
            rows.append(doc[start:start + length + 1])
            if len(rows) >= max_windows:
                break
        if len(rows) >= max_windows:
            break
    if not rows:
        raise ValueError(f"length: no held-out document has {length + 1} tokens")
    rows = np.stack(rows).astype(np.int32)
    return rows[:, :-1], rows[:, 1:]


def functional_train_step(model, tx, donate: bool = True):
    """A pure, jitted train step over the split ``(model, optimizer)`` state (so it can be lowered, inspected with
    ``memory_analysis`` and timed without NNX bookkeeping in the loop).

    Returns ``(step, state)`` with ``step(state, x, y, mask) -> (state, loss)`` (masked cross-entropy; see
    ``masked_xent``) and ``state`` the initial state (``model``'s parameters are not updated in place).
    """
    import jax
    from flax import nnx

    opt = _nnx_optimizer(model, tx)
    graphdef, state = nnx.split((model, opt))

    def step(state, x, y, m):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(model):
            return masked_xent(model(x), y, m)[0]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        _opt_update(opt, model, grads)
        return nnx.split((model, opt))[1], loss

    return jax.jit(step, donate_argnums=(0,) if donate else ()), state


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


def _nnx_optimizer(model, tx):
    """``nnx.Optimizer`` across flax versions (``wrt`` became required in 0.11)."""
    from flax import nnx

    try:
        return nnx.Optimizer(model, tx, wrt=nnx.Param)
    except TypeError:
        return nnx.Optimizer(model, tx)


def _opt_update(opt, model, grads):
    try:
        opt.update(model, grads)
    except TypeError:
        opt.update(grads)


def lm_eval_loss(model, inputs, labels, mask=None, batch_size: int = 8):
    """Mean per-position cross-entropy of ``model`` over arrays ``inputs``/``labels`` [N, T] (float64 numpy sums).

    Returns (per_position_loss [T] numpy float64, mean_loss float)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    @nnx.jit
    def f(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x).astype(jnp.float32), y)

    if len(inputs) == 0:
        raise ValueError("inputs: expected at least one row")

    n, t = inputs.shape
    total = np.zeros(t, np.float64)
    count = np.zeros(t, np.float64)
    for i in range(0, n, batch_size):
        x = inputs[i:i + batch_size]
        y = labels[i:i + batch_size]
        m = np.ones_like(y, np.float64) if mask is None else np.asarray(mask[i:i + batch_size], np.float64)
        losses = np.asarray(jax.device_get(f(model, jnp.asarray(x), jnp.asarray(y))), np.float64)
        total += (losses * m).sum(0)
        count += m.sum(0)
    per_pos = total / np.maximum(count, 1)
    return per_pos, float(total.sum() / max(count.sum(), 1))


def timer():
    """A ``perf_counter``-based stopwatch: ``t = timer(); ...; t()`` returns elapsed seconds."""
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
