"""fla / Hugging Face checkpoints <-> gla-jax models, without torch, for every registered model family.

A checkpoint is a directory with ``config.json`` (its ``model_type`` picks the family through the registry: "gla",
"transformer", ...) and ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``). Tensor names
follow fla's ``<Family>ForCausalLM`` (``model.layers.{i}.*``); each family's ``hf_layout`` maps them onto our stacked
``[L, ...]`` parameters (docs/design.md §4). PyTorch ``Linear`` weights are stored ``[out, in]`` where ``nnx.Linear``
kernels are ``[in, out]``, and short-convolution weights ``[channels, 1, width]`` where ours are ``[channels, width]``.
The config translation is the config classes' own codec (``from_hf``/``to_hf_dict``).

    from gla_jax.convert import load_hf, save_hf, load_fla, save_fla
    config, model = load_hf("path/to/hf-dir")           # any registered family; float32 parameters by default
    save_hf(model, "path/to/out-dir")                   # loadable by fla's <Family>ForCausalLM.from_pretrained
    config, model = load_fla("path/to/fla-gla-dir")     # the same, for GLA checkpoints only

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused: unpickling can run arbitrary code, and reading them
needs torch. Convert them to safetensors with fla first (``model.save_pretrained(dir, safe_serialization=True)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


# ------------------------------------------------------------------------------------------------- safetensors IO


def _refuse_pickle(path: Path) -> None:
    raise ValueError(f"path: {path} is a pickle checkpoint; pickle files are refused (loading them can run code). "
                     "Re-save it with fla as safetensors: model.save_pretrained(dir, safe_serialization=True)")


def _safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order when sharded."""
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        raise ValueError(f"path: expected an fla checkpoint directory (config.json + *.safetensors), got file {path}")
    if not path.is_dir():
        raise ValueError(f"path: no such directory: {path}")
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{INDEX_NAME}: not a safetensors index with a 'weight_map' ({e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ValueError(f"{INDEX_NAME}: shard {missing[0]!r} listed in the index is missing from {path}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle(pickles[0])
        raise ValueError(f"path: no *.safetensors weights in {path}")
    return files


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an fla checkpoint directory as numpy arrays (bfloat16 as ml_dtypes.bfloat16), by name."""
    from safetensors import safe_open

    path = Path(path)
    files = _safetensors_files(path)
    index = path / INDEX_NAME
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        with _open_safetensors(safe_open, file) as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"{name}: tensor stored twice (second copy in {file.name})")
                if weight_map is not None and weight_map.get(name) != file.name:
                    raise ValueError(f"{name}: found in {file.name} but {INDEX_NAME} places it in "
                                     f"{weight_map.get(name)!r}")
                tensors[name] = f.get_tensor(name)
    if weight_map is not None:
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise ValueError(f"{absent[0]}: listed in {INDEX_NAME} but not found in {weight_map[absent[0]]}")
    return tensors


def _open_safetensors(safe_open, file: Path):
    """``safe_open(file)``; a file that is not safetensors (truncated, another format) is one ValueError line."""
    try:
        return safe_open(str(file), framework="numpy")
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError: say which file, in one line
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"path: {file} is not a readable safetensors file ({why})") from None


def write_safetensors(tensors: dict[str, np.ndarray], file: str | os.PathLike) -> None:
    """Writes one safetensors file with the metadata transformers expects (``format: pt``)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------------ configs


def config_from_fla(raw: dict, **overrides):
    """Our ``GLAConfig`` from the dict of an fla ``config.json`` (``GLAConfig.from_hf``)."""
    from gla_jax.models import GLAConfig

    return GLAConfig.from_hf(raw, **overrides)


def config_to_fla(config) -> dict:
    """The fla ``config.json`` dict for our ``GLAConfig`` (``config.to_hf_dict()``)."""
    return config.to_hf_dict()


def fla_layout(config, *, fused_norm_gate: bool | None = None) -> dict:
    """fla tensor name -> ``HFTensor`` (our stacked parameter, its layer, layout kind, fla shape) for a GLA config.
    ``fused_norm_gate`` picks the output norm's name (``attn.g_norm_swish_gate`` / ``attn.g_norm``; default: what
    fla builds from ``config``)."""
    from gla_jax.models.gla import gla_hf_layout

    raw = None if fused_norm_gate is None else {"fuse_norm": fused_norm_gate}
    return gla_hf_layout(config, raw)


# ---------------------------------------------------------------------------------------------------- tensor map


def _normalize_tensors(tensors: dict[str, np.ndarray], layout: dict, tied: bool) -> dict:
    """Maps older or alternative fla layouts onto ``layout``'s names: fused MLP ``gate_proj [2I, D]``, either name
    of GLA's output norm, a redundant ``lm_head.weight`` in tied checkpoints."""
    tensors = dict(tensors)
    for name in list(tensors):
        # older fla: one gate_proj holding [gate; up] along the output axis
        if name.endswith(".mlp.gate_proj.weight"):
            up = name.replace("gate_proj", "up_proj")
            want = layout.get(name)
            if up not in tensors and want is not None and tensors[name].shape == (2 * want.shape[0], want.shape[1]):
                fused = tensors.pop(name)
                tensors[name], tensors[up] = fused[: want.shape[0]], fused[want.shape[0]:]
        for a, b in (("g_norm_swish_gate.weight", "g_norm.weight"), ("g_norm.weight", "g_norm_swish_gate.weight")):
            if name.endswith(".attn." + a) and name not in layout:
                other = name[: -len(a)] + b
                if other in layout and other not in tensors:
                    tensors[other] = tensors.pop(name)
    if tied and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        emb_name = next((n for n, e in layout.items() if e.ours == ("model", "embeddings", "embedding")),
                        "model.embeddings.weight")
        emb = tensors.get(emb_name)
        if emb is None or head.shape != emb.shape or not np.array_equal(head, emb):
            raise ValueError(f"lm_head.weight: present and different from {emb_name} although "
                             "tie_word_embeddings is true")
    return tensors


def _hf_to_ours(arr: np.ndarray, entry, target_shape: tuple) -> np.ndarray:
    """One HF tensor in our layout of one layer (``target_shape``: the parameter's shape without the layer axis)."""
    if entry.kind == "linear":
        arr = arr.T
    elif entry.kind == "conv":
        arr = arr[:, 0, :]  # [C, 1, W] -> [C, W]
    if tuple(arr.shape) != tuple(target_shape):
        raise ValueError(f"hf -> gla_jax: {'.'.join(entry.ours)} expects shape {tuple(target_shape)}, mapped tensor "
                         f"has {arr.shape}")
    return arr


def _ours_to_hf(arr: np.ndarray, entry) -> np.ndarray:
    if entry.kind == "linear":
        arr = arr.T
    elif entry.kind == "conv":
        arr = arr[:, None, :]
    if tuple(arr.shape) != entry.shape:
        raise ValueError(f"{'.'.join(entry.ours)}: shape {arr.shape} does not map to HF shape {entry.shape}")
    return np.ascontiguousarray(arr)


def _params(model) -> dict:
    """Attribute path (tuple of str) -> the model's ``nnx.Param``."""
    from flax import nnx

    return {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _check_mapped(params: dict, layout: dict) -> None:
    mapped = {e.ours for e in layout.values()}
    extra = sorted(set(params) - mapped)
    if extra:
        raise ValueError(f"model: parameter {'.'.join(extra[0])} has no fla/HF counterpart (unsupported config option?)")
    absent = sorted(mapped - set(params))
    if absent:
        raise ValueError(f"model: has no parameter {'.'.join(absent[0])} for the HF tensor map")


# -------------------------------------------------------------------------------------------------- public API


def read_fla_config(path: str | os.PathLike) -> dict:
    """The raw ``config.json`` dict of an fla/HF checkpoint directory."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if not path.is_dir():
        raise ValueError(f"path: no such directory: {path}")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"path: no {CONFIG_NAME} in {path}")
    try:
        raw = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{CONFIG_NAME}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{CONFIG_NAME}: expected a JSON object, got {type(raw).__name__}")
    return raw


read_hf_config = read_fla_config


def _load(path: Path, raw: dict, family, rngs, overrides):
    import jax.numpy as jnp
    from flax import nnx

    if family.hf_layout is None:
        raise ValueError(f"model_type: family {family.name!r} has no fla/HF tensor map")
    config = family.config_class.from_hf(raw, **overrides)
    tensors = read_safetensors(path)
    layout = family.hf_layout(config, raw)
    tensors = _normalize_tensors(tensors, layout, tied=bool(config.tie_word_embeddings))
    for name in tensors:
        if name not in layout:
            hint = (" (a layer of a hybrid model, or an option this config does not enable?)" if ".attn." in name
                    else "")
            raise ValueError(f"{name}: unknown tensor for this {family.name} config{hint}")
    for name, entry in layout.items():
        if name not in tensors:
            raise ValueError(f"{name}: missing from the checkpoint")
        arr = tensors[name]
        if tuple(arr.shape) != entry.shape:
            raise ValueError(f"{name}: shape {tuple(arr.shape)} does not match the config (expected {entry.shape})")
        if np.dtype(arr.dtype).name not in ("float16", "bfloat16", "float32", "float64"):
            raise ValueError(f"{name}: dtype {arr.dtype} is not a floating-point type")

    rngs = nnx.Rngs(0) if rngs is None else rngs
    # Abstract construction (no initializers run: every parameter is overwritten below); a model holding other
    # state than parameters is built for real so that state gets its initial values.
    model = nnx.eval_shape(lambda r: family.model_class(config, rngs=r), rngs)
    if any(not isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(nnx.state(model))):
        model = family.model_class(config, rngs=rngs)
    params = _params(model)
    _check_mapped(params, layout)
    values: dict[tuple, np.ndarray] = {}
    for name, entry in layout.items():
        var = params[entry.ours]
        target = var.get_value()
        if entry.layer is None:
            values[entry.ours] = _hf_to_ours(tensors[name], entry, target.shape).astype(target.dtype)
        else:  # one slice of a stacked [L, ...] parameter
            buf = values.setdefault(entry.ours, np.zeros(target.shape, target.dtype))
            buf[entry.layer] = _hf_to_ours(tensors[name], entry, target.shape[1:])
    for path, value in values.items():
        params[path].set_value(jnp.asarray(value))
    return config, model


def load_hf(path: str | os.PathLike, *, rngs=None, **config_overrides):
    """Loads an fla/HF checkpoint directory of any registered family into ``(config, model)``, the family chosen by
    ``config.json``'s ``model_type`` (``gla_jax.models.family_for_hf``).

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).
      rngs: ``nnx.Rngs`` for the model constructor (default ``nnx.Rngs(0)``; the weights are all overwritten).
      **config_overrides: our config fields to set on top of config.json (e.g. ``param_dtype``, ``dtype``, the op
        implementation, ``scan_layers``); they must not change parameter shapes.

    Parameters are cast to the model's ``param_dtype`` (float32 by default: bfloat16 checkpoints upcast exactly).
    Raises ValueError naming the key for unsupported configs, unknown, missing or misshapen tensors, and pickle files.
    """
    from gla_jax.models.registry import family_for_hf

    path = Path(path)
    raw = read_fla_config(path)
    if "model_type" not in raw:
        raise ValueError(f"{CONFIG_NAME}: no model_type in {path}")
    return _load(path, raw, family_for_hf(raw["model_type"]), rngs, config_overrides)


def save_hf(model, path: str | os.PathLike, *, config=None, dtype=None) -> Path:
    """Writes ``model`` (any registered family with an HF map) as an fla/HF checkpoint directory: ``config.json``
    (``config.to_hf_dict()``) and ``model.safetensors``, loadable by fla's ``<Family>ForCausalLM.from_pretrained``
    and transformers' ``AutoModelForCausalLM`` (with fla imported).

    Args:
      model: our causal LM.
      path: output directory (created; existing config.json / model.safetensors are overwritten).
      config: its config (default ``model.config``).
      dtype: tensor dtype in the file ("float32", "bfloat16", "float16"; default: the parameters' own dtype).
    Returns the directory.
    """
    from gla_jax.models.registry import family_of

    config = model.config if config is None else config
    family = family_of(config)
    if family.hf_layout is None:
        raise ValueError(f"model: family {family.name!r} has no fla/HF tensor map")
    hf_config = config.to_hf_dict()
    layout = family.hf_layout(config, hf_config)
    params = _params(model)
    _check_mapped(params, layout)
    if dtype is not None:
        import jax.numpy as jnp

        try:
            dtype = np.dtype(jnp.dtype(dtype))
        except TypeError:
            raise ValueError(f"dtype: not a dtype: {dtype!r}") from None
        if dtype.name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: must be float32, bfloat16 or float16, got {dtype.name}")
    tensors = {}
    file_dtype = None
    for name, entry in layout.items():
        arr = np.asarray(params[entry.ours].get_value())
        if entry.layer is not None:
            arr = arr[entry.layer]
        if dtype is not None:
            arr = arr.astype(dtype)
        file_dtype = file_dtype or arr.dtype
        tensors[name] = _ours_to_hf(arr, entry)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    hf_config["dtype"] = np.dtype(file_dtype).name
    (path / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if (path / INDEX_NAME).exists():  # a stale shard index would shadow the new single file
        (path / INDEX_NAME).unlink()
    write_safetensors(tensors, path / WEIGHTS_NAME)
    return path


def load_fla(path: str | os.PathLike, *, rngs=None, **config_overrides):
    """Loads an fla GLA checkpoint directory into ``(GLAConfig, GLAForCausalLM)`` (``load_hf`` restricted to GLA;
    a config.json without ``model_type`` is read as GLA)."""
    from gla_jax.models.registry import get_family

    path = Path(path)
    raw = read_fla_config(path)
    model_type = raw.get("model_type", "gla")
    if model_type != "gla":
        raise ValueError(f"config.json: model_type {model_type!r} is not 'gla' (load_fla reads GLA checkpoints; "
                         "load_hf reads every registered family)")
    return _load(path, raw, get_family("gla"), rngs, config_overrides)


def save_fla(model, config, path: str | os.PathLike, *, dtype=None) -> Path:
    """Writes our ``GLAForCausalLM`` and its ``GLAConfig`` as an fla checkpoint directory (``save_hf`` for GLA)."""
    if getattr(config, "model_type", None) != "gla":
        raise ValueError(f"config: save_fla writes GLA models, got {type(config).__name__} (use save_hf)")
    return save_hf(model, path, config=config, dtype=dtype)


__all__ = ["load_fla", "load_hf", "save_fla", "save_hf", "read_safetensors", "write_safetensors", "config_from_fla",
           "config_to_fla", "fla_layout", "read_fla_config", "read_hf_config"]
