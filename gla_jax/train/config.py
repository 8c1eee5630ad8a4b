"""Typed training configuration: dataclass sections loaded from YAML plus dotted ``key=value`` overrides.

The defaults of every section *are* the embedded default run (``gla-jax train`` with no arguments): a small GLA on the
Python standard library's own source files, byte-level tokens, sized to finish in a few minutes on two CPU cores.

Sections: ``model`` (architecture, optional preset, and any field of the model's config class), ``data``, ``optim``,
``mesh``, ``checkpoint``, ``train``, ``distributed``. Unknown keys and badly typed values raise
``ConfigError`` (a ``ValueError``) with one line naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gla_jax.errors import UserError


class ConfigError(UserError):
    """A bad configuration key or value; the message names the dotted key."""


@dataclass
class ModelSection:
    """Which model to build. ``arch``: a registered model family ("gla", "transformer", ...); ``preset``: a named model config to start from
    (``gla_jax.models`` presets); ``overrides``: fields of the model's config class (checked against it when the
    model is built; in YAML and on the command line they are written as ``model.<field>``)."""

    arch: str = "gla"
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=128, num_hidden_layers=2, num_heads=2, vocab_size=320, tie_word_embeddings=True))


@dataclass
class DataSection:
    """Where tokens come from and how they are packed.

    ``source``: "stdlib" (the Python standard library's .py files, always available offline), a text file, a glob of
    files, or a comma-separated list of them. ``format``: "auto" (by extension: .jsonl/.json -> jsonl, .npy -> npy,
    .array_record -> arrayrecord, else text), "text", "jsonl", "npy" or "arrayrecord". ``tokenizer``: "byte" or a path
    to an HF ``tokenizer.json``. ``seq_len`` tokens per packed row; ``batch_size`` rows per optimizer step (global,
    over all processes and micro-batches)."""

    source: str = "stdlib"
    format: str = "auto"
    text_field: str = "text"
    tokenizer: str = "byte"
    seq_len: int = 128
    batch_size: int = 16
    shuffle_seed: int = 0
    val_fraction: float = 0.02
    max_docs: int = 0  # 0: all documents
    num_shards: int = 0  # 0: one data shard per process; fix it to make batches independent of the process count
    shuffle_window: int = 1024  # packed rows shuffled within windows of this many rows (0/1: off)
    read_threads: int = 2
    prefetch: int = 64
    errors: str = "strict"  # text that is not UTF-8: "strict" refuses the file, "replace" reads U+FFFD and warns


@dataclass
class OptimSection:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``; global-norm clipping."""

    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclass
class MeshSection:
    """Device mesh ``data x fsdp x tensor``; one entry may be -1 (use all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass
class CheckpointSection:
    """Orbax checkpoints in ``<workdir>/checkpoints``: every ``every`` steps, at the end and on SIGTERM/SIGINT."""

    enabled: bool = True
    every: int = 100
    keep: int = 3
    async_save: bool = True


@dataclass
class TrainSection:
    """Loop settings. ``compute_dtype``: dtype of activations/matmuls ("float32" or "bfloat16"); parameters and
    optimizer state are always float32. ``peak_flops``: per-device peak FLOP/s for MFU (0: look up the device)."""

    steps: int = 300
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    compute_dtype: str = "float32"
    remat: bool = False
    peak_flops: float = 0.0
    progress: bool = True
    sample_tokens: int = 200
    sample_prompt: str = "def "
    sample_temperature: float = 0.7
    # "START:STOP": a jax.profiler trace of steps START+1..STOP in <workdir>/profile ("" = none)
    profile: str = ""
    # Parameters to start a new run from (a `gla-jax convert --from-hf` output, a `save_params` folder or another
    # run's workdir); the model config must match them. Ignored when the workdir already holds a checkpoint.
    init_from: str | None = None


@dataclass
class DistributedSection:
    """Multi-process setup for ``jax.distributed.initialize``. ``mode``: "auto" (initialize when the environment
    names a cluster, e.g. SLURM, or when ``coordinator`` is set), "off", or "on"."""

    mode: str = "auto"
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: str = ""  # comma-separated
    # a peer silent (hung, stopped, dead) this long ends every process with one line naming it (watchdog); 0: off
    timeout_s: float = 300.0


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    train: TrainSection = field(default_factory=TrainSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {
    "model": ModelSection, "data": DataSection, "optim": OptimSection, "mesh": MeshSection,
    "checkpoint": CheckpointSection, "train": TrainSection, "distributed": DistributedSection,
}


# ----------------------------------------------------------------------------------------------------------------
# value coercion

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Converts ``value`` (from YAML or a command-line string) to the annotated type ``tp``; ConfigError naming
    ``key`` when it does not fit."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "str": str, "bool": bool}.get(tp, Any)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is Any:
        return _parse_scalar(value) if isinstance(value, str) else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                v = float(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
            if v.is_integer():
                return int(v)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return origin(coerce(key, v, inner) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _parse_scalar(text: str) -> Any:
    """A command-line value without a declared type: YAML scalar rules (ints, floats, bools, null, strings)."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return v if isinstance(v, (int, float, bool, str, list, type(None))) else text


# ----------------------------------------------------------------------------------------------------------------
# building and overriding

def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{dotted}: expected SECTION.KEY (sections: {', '.join(SECTIONS)})")
    section, key = parts[0], ".".join(parts[1:])
    if section not in _SECTION_CLASSES:
        raise ConfigError(f"{dotted}: unknown section {section!r} (sections: {', '.join(SECTIONS)})")
    sec = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sec)}
    if section == "model" and key not in ("arch", "preset"):
        if key == "overrides":
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping")
            for k, v in value.items():
                _set(cfg, f"model.{k}", v)
            return
        if "." in key:
            raise ConfigError(f"{dotted}: unknown key")
        sec.overrides[key] = _parse_scalar(value) if isinstance(value, str) else value
        return
    if "." in key or key not in fields:
        raise ConfigError(f"{dotted}: unknown key (known: {', '.join(fields)})")
    hints = typing.get_type_hints(type(sec))
    setattr(sec, key, coerce(dotted, value, hints[key]))


def _apply_mapping(cfg: Config, mapping: Any, where: str) -> None:
    if mapping is None:
        return
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(mapping).__name__}")
    for section, body in mapping.items():
        if section not in _SECTION_CLASSES:
            raise ConfigError(f"{section}: unknown section in {where} (sections: {', '.join(SECTIONS)})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a mapping in {where}")
        for key, value in body.items():
            _set(cfg, f"{section}.{key}", value)


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """``["optim.lr=1e-3", ...]`` -> ``[("optim.lr", "1e-3"), ...]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item}: expected KEY=VALUE (e.g. optim.lr=1e-3)")
        k, v = item.split("=", 1)
        out.append((k.strip(), v))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | list[tuple[str, Any]] = ()) -> Config:
    """Default config, then the YAML file (if any), then ``overrides`` (``"a.b=v"`` strings or pairs); validated.

    A YAML file whose ``model`` section names an ``arch`` or a ``preset`` starts that section from an empty
    override set (so a preset is not mixed with the embedded default's small sizes); so does ``model.preset=...``
    on the command line. ``model.arch=transformer`` alone keeps the default's small sizes.
    """
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {str(p)!r}")
        try:
            mapping = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {p} is not valid YAML ({str(e).splitlines()[0]})") from None
        if isinstance(mapping, dict) and isinstance(mapping.get("model"), dict):
            m = mapping["model"]
            if "preset" in m or "arch" in m:
                cfg.model.overrides = {}
        _apply_mapping(cfg, mapping, str(p))
    pairs = parse_overrides(list(overrides)) if overrides and isinstance(next(iter(overrides)), str) else overrides
    if path is None and any(k == "model.preset" for k, _ in pairs):
        cfg.model.overrides = {}  # a preset replaces the embedded default's model sizes (in any argument order)
    for k, v in pairs:
        _set(cfg, k, v)
    validate(cfg)
    return cfg


def parse_profile(spec: str) -> tuple[int, int]:
    """``train.profile`` "START:STOP" -> (START, STOP): trace steps START+1 .. STOP."""
    try:
        first, last = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ConfigError(f"train.profile: expected START:STOP step numbers, got {spec!r}") from None
    if not 0 <= first < last:
        raise ConfigError(f"train.profile: expected 0 <= START < STOP, got {spec!r}")
    return first, last


def validate(cfg: Config) -> None:
    """Value checks that do not need devices or the model: one ConfigError naming the key."""
    def need(cond, key, msg):
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    from gla_jax.models.registry import families

    need(cfg.model.arch in families(), "model.arch",
         f"expected a registered model family ({', '.join(families())}), got {cfg.model.arch!r}")
    d = cfg.data
    need(d.format in ("auto", "text", "jsonl", "npy", "arrayrecord"), "data.format",
         f"expected auto/text/jsonl/npy/arrayrecord, got {d.format!r}")
    need(bool(d.source), "data.source", "must not be empty")
    need(d.seq_len >= 2, "data.seq_len", f"must be >= 2, got {d.seq_len}")
    need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    need(d.max_docs >= 0, "data.max_docs", "must be >= 0")
    need(d.num_shards >= 0, "data.num_shards", "must be >= 0")
    need(d.read_threads >= 0, "data.read_threads", "must be >= 0")
    need(d.prefetch >= 0, "data.prefetch", "must be >= 0")
    need(d.shuffle_window >= 0, "data.shuffle_window", "must be >= 0")
    need(d.errors in ("strict", "replace"), "data.errors", f"expected strict or replace, got {d.errors!r}")
    o = cfg.optim
    need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number, got {o.lr}")
    need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    need(0.0 <= o.b1 < 1.0, "optim.b1", "must be in [0, 1)")
    need(0.0 <= o.b2 < 1.0, "optim.b2", "must be in [0, 1)")
    need(o.eps > 0, "optim.eps", "must be > 0")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)")
    need(o.grad_accum >= 1, "optim.grad_accum", "must be >= 1")
    need(d.batch_size % o.grad_accum == 0, "optim.grad_accum",
         f"must divide data.batch_size ({d.batch_size}), got {o.grad_accum}")
    m = cfg.mesh
    for name in ("data", "fsdp", "tensor"):
        v = getattr(m, name)
        need(v == -1 or v >= 1, f"mesh.{name}", f"must be >= 1 or -1, got {v}")
    need([m.data, m.fsdp, m.tensor].count(-1) <= 1, "mesh", "at most one of data/fsdp/tensor may be -1")
    c = cfg.checkpoint
    need(c.every >= 1, "checkpoint.every", "must be >= 1")
    need(c.keep >= 1, "checkpoint.keep", "must be >= 1")
    t = cfg.train
    need(t.steps >= 0, "train.steps", "must be >= 0")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: no evaluation during training)")
    need(t.eval_batches >= 0, "train.eval_batches", "must be >= 0")
    need(t.compute_dtype in ("float32", "bfloat16", "float16"), "train.compute_dtype",
         f"expected float32/bfloat16/float16, got {t.compute_dtype!r}")
    need(t.peak_flops >= 0, "train.peak_flops", "must be >= 0")
    need(t.sample_tokens >= 0, "train.sample_tokens", "must be >= 0")
    if t.profile:
        parse_profile(t.profile)
    need(t.sample_temperature >= 0, "train.sample_temperature", "must be >= 0")
    ds = cfg.distributed
    need(ds.mode in ("auto", "on", "off"), "distributed.mode", f"expected auto/on/off, got {ds.mode!r}")
    need(ds.num_processes >= 0, "distributed.num_processes", "must be >= 0")
    need(ds.timeout_s >= 0 and math.isfinite(ds.timeout_s), "distributed.timeout_s",
         f"must be >= 0 seconds (0: no watchdog), got {ds.timeout_s}")


# ----------------------------------------------------------------------------------------------------------------
# serialization

def to_dict(cfg: Config) -> dict:
    """Plain nested dict (the model section flattened: arch, preset and the override fields)."""
    out = {}
    for f in dataclasses.fields(cfg):
        sec = getattr(cfg, f.name)
        body = dataclasses.asdict(sec)
        if f.name == "model":
            body = {"arch": sec.arch, "preset": sec.preset, **sec.overrides}
        out[f.name] = body
    return out


def from_dict(mapping: dict) -> Config:
    """Inverse of ``to_dict`` (validated)."""
    cfg = Config()
    if isinstance(mapping.get("model"), dict):
        cfg.model.overrides = {}
    _apply_mapping(cfg, mapping, "config")
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path, extra: dict | None = None) -> None:
    """Writes the resolved config as YAML (and ``extra`` resolved facts, e.g. the model config, as JSON beside)."""
    path = Path(path)
    path.write_text(dump_yaml(cfg))
    if extra is not None:
        path.with_suffix(".json").write_text(json.dumps(extra, indent=2, default=str))
