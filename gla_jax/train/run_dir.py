"""A workdir belongs to one run: check a resume against the saved settings before anything is written.

``prepare_run_dir`` is called once per process before training starts. It refuses, with one ``UserError`` line:
  - a workdir that is a file, or that cannot be created or written (nothing is left behind);
  - a data source that names no files;
  - resuming (the workdir holds checkpoints or metrics of a run, see ``holds_run``) with settings that differ from the saved ones in a key outside ``MAY_CHANGE_ON_RESUME`` -- such a change would alter the parameter
    shapes, the optimizer's trajectory or the order of the data, so the checkpoints would no longer belong to the run.
Only when every check passes does the main process write ``config.yaml`` and ``model_config.json`` (atomically:
a temporary file renamed into place). See docs/design.md §6.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from gla_jax.errors import UserError

# Dotted config keys (a trailing ".*" covers a whole section) that may differ between a run and its resumption:
# they change how long, how often and where the run works, never the parameter shapes, the optimizer's
# hyper-parameters or the order of the data. Everything else must match the saved config.yaml.
MAY_CHANGE_ON_RESUME = (
    "train.steps",              # train longer (or stop earlier)
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.progress",
    "train.peak_flops",
    "train.sample_tokens",
    "train.sample_prompt",
    "train.sample_temperature",
    "train.init_from",          # only read when a run starts; ignored once the workdir holds a checkpoint
    "train.remat",              # recomputation: same numbers, other memory/time trade-off
    "checkpoint.*",             # cadence, how many are kept, async or not
    "mesh.*",                   # checkpoints restore onto any mesh
    "distributed.*",            # process count may change when data.num_shards is fixed
    "data.read_threads",
    "data.prefetch",
)

# Model-config fields (model_config.json) that follow a key of MAY_CHANGE_ON_RESUME.
_MODEL_MAY_CHANGE = ("remat",)

RUN_FILES = ("config.yaml", "model_config.json")


def may_change(key: str) -> bool:
    """True if the dotted config ``key`` may differ on resume (listed in ``MAY_CHANGE_ON_RESUME``)."""
    for allowed in MAY_CHANGE_ON_RESUME:
        if key == allowed or (allowed.endswith(".*") and key.startswith(allowed[:-1])):
            return True
    return False


def flatten(mapping: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def holds_run(workdir: Path) -> bool:
    """True if ``workdir`` holds a run that made progress: a checkpoint step (also a damaged one set aside) or
    logged metrics. A workdir with only ``config.yaml``/``model_config.json`` (a run that stopped before its first
    step, e.g. on a data error) holds nothing to protect: a new run may take it over."""
    metrics = workdir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return True
    ck = workdir / "checkpoints"
    if not ck.is_dir():
        return False
    return any(p.name.isdigit() for p in ck.iterdir()) or (ck / "damaged").is_dir()


def config_differences(saved: dict, requested: dict) -> list[str]:
    """``"key: saved -> requested"`` for every flattened key outside ``MAY_CHANGE_ON_RESUME`` that differs."""
    a, b = flatten(saved), flatten(requested)
    out = []
    for key in sorted(set(a) | set(b)):
        if may_change(key):
            continue
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def _saved_config(workdir: Path) -> dict | None:
    from gla_jax.train import config as config_lib

    path = workdir / "config.yaml"
    if not path.is_file():
        return None
    try:
        return config_lib.to_dict(config_lib.load_config(path))
    except ValueError as e:
        raise UserError(f"--workdir {workdir}: its config.yaml cannot be read ({str(e).splitlines()[0]}); "
                        "use another --workdir") from None


def _saved_model_config(workdir: Path) -> dict | None:
    path = workdir / "model_config.json"
    if not path.is_file():
        return None
    try:
        out = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--workdir {workdir}: its model_config.json cannot be read ({type(e).__name__}); "
                        "use another --workdir") from None
    if not isinstance(out, dict):
        raise UserError(f"--workdir {workdir}: its model_config.json is not a JSON object; use another --workdir")
    return out


def check_resume(workdir: Path, cfg, model_config: dict | None = None) -> bool:
    """Compares the requested config (and model config dict) with the ones saved in ``workdir``. Returns True when
    the workdir holds a run (a resume), False for a new run; UserError naming the differing keys otherwise."""
    from gla_jax.train import config as config_lib

    if not holds_run(workdir):
        return False
    saved = _saved_config(workdir)
    if saved is None:
        raise UserError(f"--workdir {workdir}: holds a run but no config.yaml, so a resume cannot be checked; "
                        "use another --workdir (train.init_from=<that workdir> starts a new run from its parameters)")
    diffs = config_differences(saved, config_lib.to_dict(cfg))
    saved_model = _saved_model_config(workdir)
    if not diffs and saved_model is not None and model_config is not None:
        m_old = {k: v for k, v in saved_model.items() if k not in _MODEL_MAY_CHANGE}
        m_new = json.loads(json.dumps({k: v for k, v in model_config.items() if k not in _MODEL_MAY_CHANGE},
                                      default=str))
        diffs = [f"model_config.json {k}: {m_old.get(k)!r} -> {m_new.get(k)!r}"
                 for k in sorted(set(m_old) | set(m_new)) if m_old.get(k) != m_new.get(k)]
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise UserError(f"--workdir {workdir}: holds a run with other settings ({shown}); these would change the "
                        f"parameter shapes, the optimizer or the data order. Use another --workdir for a new run "
                        f"(add train.init_from={workdir} to start it from this run's parameters)")
    return True


def _check_data_source(cfg) -> None:
    from gla_jax.train import data as data_lib

    if cfg.data.source == "stdlib":
        return
    try:
        data_lib._expand(cfg.data.source)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None


def _check_location(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: is a file, not a directory; pass a directory")
    parent = workdir
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--workdir {workdir}: {parent} is a file, not a directory")


def _make_dirs(workdir: Path) -> None:
    """Creates ``workdir`` (and missing parents) and probes that it is writable; on failure removes the folders it
    created and raises UserError."""
    created = []
    p = workdir
    while not p.exists():
        created.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        for d in reversed(created):
            d.mkdir()
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=workdir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                pass
        raise UserError(f"--workdir {workdir}: cannot write there ({e.strerror or type(e).__name__})") from None


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prepare_run_dir(workdir: str | Path, cfg, model_config: dict | None = None, *, is_main: bool = True) -> bool:
    """Checks that ``workdir`` may hold this run and, on the main process, writes its ``config.yaml`` and
    ``model_config.json``. ``model_config``: the resolved model config as a dict (``mcfg.to_dict()``).

    Returns True when resuming an existing run, False for a new one. Raises ``UserError`` (one line) before writing
    anything when the workdir is a file or not writable, the data source names no files, or the saved run's settings
    differ in a key outside ``MAY_CHANGE_ON_RESUME``."""
    from gla_jax.train import config as config_lib

    workdir = Path(workdir)
    _check_location(workdir)
    _check_data_source(cfg)
    resuming = check_resume(workdir, cfg, model_config) if workdir.is_dir() else False
    if not is_main:
        return resuming
    _make_dirs(workdir)
    try:
        _write_atomic(workdir / "config.yaml", config_lib.dump_yaml(cfg))
        if model_config is not None:
            _write_atomic(workdir / "model_config.json", json.dumps(model_config, indent=2, default=str))
    except OSError as e:
        raise UserError(f"--workdir {workdir}: cannot write there ({e.strerror or type(e).__name__})") from None
    return resuming
