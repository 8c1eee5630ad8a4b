"""fla / Hugging Face GLA checkpoints <-> gla-jax models, without torch.

An fla checkpoint is a directory with ``config.json`` (``model_type: "gla"``) and ``model.safetensors`` (or shards
listed in ``model.safetensors.index.json``). Parameter names follow fla's ``GLAForCausalLM``; PyTorch ``Linear``
weights are stored ``[out, in]`` where ``nnx.Linear`` kernels are ``[in, out]``, and short-convolution weights are
stored ``[channels, 1, width]`` where ours are ``[channels, width]``.

    from gla_jax.convert import load_fla, save_fla
    config, model = load_fla("path/to/fla-dir")          # float32 parameters by default
    save_fla(model, config, "path/to/out-dir")          # loadable by fla's GLAForCausalLM.from_pretrained

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused: unpickling can run arbitrary code, and reading them
needs torch. Convert them to safetensors with fla first (``model.save_pretrained(dir, safe_serialization=True)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# fla's GLAConfig fields and their defaults (fla 0.6). Written into config.json by save_fla so that fla rebuilds the
# same model; read by load_fla to tell unsupported settings from defaults.
FLA_DEFAULTS: dict[str, Any] = {
    "hidden_size": 2048, "expand_k": 0.5, "expand_v": 1.0, "hidden_ratio": 4, "intermediate_size": None,
    "num_hidden_layers": 24, "num_heads": 4, "num_kv_heads": None, "feature_map": None, "attn_mode": "chunk",
    "use_short_conv": False, "conv_size": 4, "use_output_gate": True, "clamp_min": None, "hidden_act": "swish",
    "max_position_embeddings": 2048, "elementwise_affine": True, "norm_eps": 1e-6, "use_gk": True, "use_gv": False,
    "attn": None, "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "initializer_range": 0.02, "fuse_norm": True, "fuse_swiglu": True,
    "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False, "use_l2warp": False, "vocab_size": 32000,
    "attnres_block_size": None,
}
# Settings that change only fla's kernels, training losses or generation bookkeeping, never the function computed:
# accepted with any value (and kept in the converted config when our GLAConfig has the field).
_KERNEL_OR_TRAINING_ONLY = {
    "attn_mode", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp",
    "use_cache", "initializer_range", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
}
# Keys Hugging Face adds to every config.json.
_HF_BOILERPLATE = {
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tie_encoder_decoder",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "chunk_size_feed_forward", "pruned_heads",
    "tf_legacy_loss", "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "cross_attention_hidden_size",
    "architectures", "keys_to_ignore_at_inference", "quantization_config", "name_or_path",
}
# Settings we cannot represent: (field, supported predicate, reason). Others (feature_map, ...) are checked by
# GLAConfig and the layers themselves.
_UNSUPPORTED = (
    ("attn", lambda v: v is None, "hybrid models with softmax-attention layers are not supported"),
    ("hidden_act", lambda v: v in ("swish", "silu"), "only the swish (SwiGLU) activation is supported"),
    ("attnres_block_size", lambda v: v is None, "attention residuals (attnres) are not supported"),
)
GATE_LOW_RANK_DIM = 16  # fla's GatedLinearAttention default; HF GLA checkpoints always use it


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


def _dims(c) -> dict[str, int]:
    """Derived sizes of an fla-style config (attribute access), checked like fla checks them."""
    D, H = int(c.hidden_size), int(c.num_heads)
    Hkv = int(c.num_kv_heads) if c.num_kv_heads is not None else H
    if H <= 0 or Hkv <= 0 or H % Hkv:
        raise ValueError(f"num_kv_heads: num_heads ({H}) must be a positive multiple of num_kv_heads ({Hkv})")
    dims = {}
    for name, ratio in (("key_dim", c.expand_k), ("value_dim", c.expand_v)):
        x = D * float(ratio)
        if not math.isclose(x, round(x)) or round(x) <= 0:
            raise ValueError(f"expand_{name[0]}: hidden_size * expand_{name[0]} = {x} is not a positive integer")
        if round(x) % H:
            raise ValueError(f"expand_{name[0]}: {name} {round(x)} is not divisible by num_heads {H}")
        dims[name] = round(x)
    groups = H // Hkv
    inter = c.intermediate_size
    if inter is None:
        ratio = 4 if c.hidden_ratio is None else c.hidden_ratio
        inter = int(D * ratio * 2 / 3)
        inter = 256 * ((inter + 255) // 256)
    return dict(D=D, H=H, Hkv=Hkv, key_dim=dims["key_dim"], value_dim=dims["value_dim"],
                key_kv=dims["key_dim"] // groups, value_kv=dims["value_dim"] // groups,
                head_v=dims["value_dim"] // H, I=int(inter), V=int(c.vocab_size), L=int(c.num_hidden_layers),
                rank=int(getattr(c, "gate_low_rank_dim", GATE_LOW_RANK_DIM) or GATE_LOW_RANK_DIM),
                conv=int(c.conv_size))


def _our_config_fields(config_cls) -> set[str]:
    if dataclasses.is_dataclass(config_cls):
        return {f.name for f in dataclasses.fields(config_cls)}
    return set(config_cls().to_dict())


def config_from_fla(raw: dict, **overrides):
    """Our ``GLAConfig`` from the dict of an fla ``config.json``; ValueError naming the first unsupported field."""
    from gla_jax.models import GLAConfig

    if not isinstance(raw, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type", "gla")
    if model_type != "gla":
        raise ValueError(f"config.json: model_type {model_type!r} is not 'gla' (only fla GLA checkpoints convert)")
    archs = raw.get("architectures") or ["GLAForCausalLM"]
    if any(a not in ("GLAForCausalLM", "GLAModel") for a in archs):
        raise ValueError(f"config.json: architectures {archs} is not ['GLAForCausalLM']")
    for key, ok, why in _UNSUPPORTED:
        if key in raw and not ok(raw[key]):
            raise ValueError(f"config.json: {key}={raw[key]!r}: {why}")
    ours = _our_config_fields(GLAConfig)
    kwargs = {}
    for key, value in raw.items():
        if key in _HF_BOILERPLATE:
            continue  # HF's "dtype" is the storage dtype, not our compute dtype
        if key in ours:
            kwargs[key] = value
        elif key in _KERNEL_OR_TRAINING_ONLY:
            continue
        elif key in FLA_DEFAULTS and value != FLA_DEFAULTS[key]:
            raise ValueError(f"config.json: {key}={value!r} is not supported by gla_jax's GLAConfig")
        # other unknown keys (newer fla/transformers bookkeeping) are ignored
    for key in FLA_DEFAULTS:  # fla's defaults where config.json omits a field
        if key in ours and key not in kwargs:
            kwargs[key] = FLA_DEFAULTS[key]
    for key, value in overrides.items():
        if key not in ours:
            raise ValueError(f"{key}: not a GLAConfig field (overrides: {sorted(overrides)})")
        kwargs[key] = value
    return GLAConfig.from_dict(kwargs) if hasattr(GLAConfig, "from_dict") else GLAConfig(**kwargs)


def config_to_fla(config) -> dict:
    """The fla ``config.json`` dict for our ``GLAConfig``."""
    ours = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    out = dict(FLA_DEFAULTS)
    for key in FLA_DEFAULTS:
        if key in ours:
            out[key] = ours[key]
    for key, ok, why in _UNSUPPORTED:
        if not ok(out[key]):
            raise ValueError(f"config.{key}={out[key]!r}: {why}")
    if out["hidden_act"] == "silu":  # the same function; fla's GatedMLP accepts only the name "swish"
        out["hidden_act"] = "swish"
    rank = ours.get("gate_low_rank_dim", GATE_LOW_RANK_DIM)
    if rank not in (None, GATE_LOW_RANK_DIM):
        raise ValueError(f"config.gate_low_rank_dim={rank}: fla's GLAForCausalLM always uses {GATE_LOW_RANK_DIM}")
    norm = ours.get("gate_logit_normalizer", 16)
    if norm not in (None, 16):
        raise ValueError(f"config.gate_logit_normalizer={norm}: fla's GLAForCausalLM always uses 16")
    if ours.get("conv_bias"):
        raise ValueError("config.conv_bias=True: fla's GLA layer has no short-convolution bias")
    gate = ours.get("gate", "gla")
    if gate not in (None, "gla"):
        raise ValueError(f"config.gate={gate!r}: fla's GLA layer has only the per-key gate ('gla')")
    out["model_type"] = "gla"
    out["architectures"] = ["GLAForCausalLM"]
    return out


# ---------------------------------------------------------------------------------------------------- name map


@dataclasses.dataclass(frozen=True)
class _Entry:
    ours: tuple  # attribute path in our model, e.g. ("model", "layers", 0, "attn", "q_proj", "kernel")
    kind: str  # "linear" ([out, in] <-> [in, out]), "conv" ([C, 1, W] <-> [C, W]), "plain"
    shape: tuple  # shape in the fla checkpoint


def _fused_norm_gate(raw_or_cfg) -> bool:
    """Whether fla builds ``attn.g_norm_swish_gate`` (fused RMSNorm+swish gate) rather than ``attn.g_norm``."""
    get = raw_or_cfg.get if isinstance(raw_or_cfg, dict) else lambda k, d=None: getattr(raw_or_cfg, k, d)
    return (bool(get("fuse_norm", True)) and get("hidden_act", "swish") == "swish"
            and bool(get("use_output_gate", True)))


def fla_layout(config, *, fused_norm_gate: bool | None = None) -> dict[str, _Entry]:
    """fla tensor name -> where it lives in our model, how it is laid out, and its fla shape.

    ``fused_norm_gate`` picks the name of the per-head output norm (``attn.g_norm_swish_gate`` when True,
    ``attn.g_norm`` when False; default: what fla builds from ``config``).
    """
    d = _dims(config)
    if fused_norm_gate is None:
        fused_norm_gate = _fused_norm_gate(config)
    D, I, rank = d["D"], d["I"], d["rank"]
    out: dict[str, _Entry] = {"model.embeddings.weight": _Entry(("model", "embeddings", "embedding"), "plain",
                                                                (d["V"], D))}
    for i in range(d["L"]):
        p, o = f"model.layers.{i}.", ("model", "layers", i)

        def add(name, ours, kind, shape):
            out[p + name] = _Entry(o + ours, kind, shape)

        add("attn_norm.weight", ("attn_norm", "weight"), "plain", (D,))
        add("attn.q_proj.weight", ("attn", "q_proj", "kernel"), "linear", (d["key_dim"], D))
        add("attn.k_proj.weight", ("attn", "k_proj", "kernel"), "linear", (d["key_kv"], D))
        add("attn.v_proj.weight", ("attn", "v_proj", "kernel"), "linear", (d["value_kv"], D))
        if getattr(config, "use_output_gate", True):
            add("attn.g_proj.weight", ("attn", "g_proj", "kernel"), "linear", (d["value_dim"], D))
        if getattr(config, "use_short_conv", False):
            for n, c in (("q", d["key_dim"]), ("k", d["key_kv"]), ("v", d["value_kv"])):
                add(f"attn.{n}_conv1d.weight", ("attn", f"{n}_conv1d", "weight"), "conv", (c, 1, d["conv"]))
        add("attn.gk_proj.0.weight", ("attn", "gk_proj_0", "kernel"), "linear", (rank, D))
        add("attn.gk_proj.1.weight", ("attn", "gk_proj_1", "kernel"), "linear", (d["key_kv"], rank))
        add("attn.gk_proj.1.bias", ("attn", "gk_proj_1", "bias"), "plain", (d["key_kv"],))
        add("attn.o_proj.weight", ("attn", "o_proj", "kernel"), "linear", (D, d["value_dim"]))
        if getattr(config, "elementwise_affine", True):
            norm = "g_norm_swish_gate" if fused_norm_gate else "g_norm"
            add(f"attn.{norm}.weight", ("attn", "g_norm", "weight"), "plain", (d["head_v"],))
        add("mlp_norm.weight", ("mlp_norm", "weight"), "plain", (D,))
        add("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "linear", (I, D))
        add("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "linear", (I, D))
        add("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "linear", (D, I))
    out["model.norm.weight"] = _Entry(("model", "norm", "weight"), "plain", (D,))
    if not getattr(config, "tie_word_embeddings", False):
        out["lm_head.weight"] = _Entry(("lm_head", "kernel"), "linear", (d["V"], D))
    return out


def _normalize_tensors(tensors: dict[str, np.ndarray], layout: dict[str, _Entry], tied: bool) -> dict:
    """Maps older or alternative fla layouts onto ``layout``'s names: fused MLP ``gate_proj [2I, D]``, either name
    of the output norm, a redundant ``lm_head.weight`` in tied checkpoints."""
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
        emb = tensors.get("model.embeddings.weight")
        if emb is None or head.shape != emb.shape or not np.array_equal(head, emb):
            raise ValueError("lm_head.weight: present and different from model.embeddings.weight although "
                             "tie_word_embeddings is true")
    return tensors


def _fla_to_ours(arr: np.ndarray, entry: _Entry, target_shape: tuple) -> np.ndarray:
    if entry.kind == "linear":
        arr = arr.T
    elif entry.kind == "conv":
        arr = arr[:, 0, :]  # [C, 1, W] -> [C, W]
        if tuple(target_shape) == arr.shape[::-1]:  # a [W, C] layout
            arr = arr.T
    if tuple(arr.shape) != tuple(target_shape):
        raise ValueError(f"fla -> gla_jax: {entry.ours} expects shape {tuple(target_shape)}, mapped tensor has "
                         f"{arr.shape}")
    return arr


def _ours_to_fla(arr: np.ndarray, entry: _Entry) -> np.ndarray:
    if entry.kind == "linear":
        arr = arr.T
    elif entry.kind == "conv":
        if arr.shape != (entry.shape[0], entry.shape[2]):
            arr = arr.T
        arr = arr[:, None, :]
    if tuple(arr.shape) != entry.shape:
        raise ValueError(f"{'.'.join(map(str, entry.ours))}: shape {arr.shape} does not map to fla shape "
                         f"{entry.shape}")
    return np.ascontiguousarray(arr)


def _get_variable(model, path: tuple):
    obj = model
    for part in path:
        try:
            obj = obj[part] if isinstance(part, int) else getattr(obj, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise ValueError(f"model: has no parameter {'.'.join(map(str, path))} (stuck at {part!r})") from None
        if obj is None:
            raise ValueError(f"model: parameter {'.'.join(map(str, path))} is None")
    return obj


def _param_paths(model) -> set[tuple]:
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    return {tuple(p) for p, _ in flat}


def _value(var):
    return var.get_value() if hasattr(var, "get_value") else var.value


def _set_value(var, value) -> None:
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


# -------------------------------------------------------------------------------------------------- public API


def read_fla_config(path: str | os.PathLike) -> dict:
    """The raw ``config.json`` dict of an fla checkpoint directory."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if not path.is_dir():
        raise ValueError(f"path: no such directory: {path}")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"path: no {CONFIG_NAME} in {path}")
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{CONFIG_NAME}: not valid JSON ({e})") from None


def load_fla(path: str | os.PathLike, *, rngs=None, **config_overrides):
    """Loads an fla GLA checkpoint directory into ``(GLAConfig, GLAForCausalLM)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).
      rngs: ``nnx.Rngs`` for the model constructor (default ``nnx.Rngs(0)``; the weights are all overwritten).
      **config_overrides: GLAConfig fields to set on top of config.json (e.g. ``param_dtype``, ``dtype``, the op
        implementation); they must not change parameter shapes.

    Parameters are cast to the model's ``param_dtype`` (float32 by default: bfloat16 checkpoints upcast exactly).
    Raises ValueError naming the key for unsupported configs, unknown, missing or misshapen tensors, and pickle files.
    """
    import jax.numpy as jnp
    from flax import nnx

    from gla_jax.models import GLAForCausalLM

    path = Path(path)
    raw = read_fla_config(path)
    tensors = read_safetensors(path)
    config = config_from_fla(raw, **config_overrides)
    layout = fla_layout(config, fused_norm_gate=_fused_norm_gate(raw))
    tensors = _normalize_tensors(tensors, layout, tied=bool(getattr(config, "tie_word_embeddings", False)))
    for name in tensors:
        if name not in layout:
            hint = (" (softmax-attention layer of a hybrid model?)" if ".attn." in name and any(
                s in name for s in ("qkv", "q_norm", "k_norm", "rotary")) else "")
            raise ValueError(f"{name}: unknown tensor for this GLA config{hint}")
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
    model = nnx.eval_shape(lambda r: GLAForCausalLM(config, rngs=r), rngs)
    if any(not isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(nnx.state(model))):
        model = GLAForCausalLM(config, rngs=rngs)
    expected = _param_paths(model)
    mapped = {e.ours for e in layout.values()}
    extra = sorted(expected - mapped, key=str)
    if extra:
        raise ValueError(f"model: parameter {'.'.join(map(str, extra[0]))} has no fla counterpart "
                         f"(unsupported config option?)")
    for name, entry in layout.items():
        var = _get_variable(model, entry.ours)
        target = _value(var)
        arr = _fla_to_ours(tensors[name], entry, tuple(target.shape))
        _set_value(var, jnp.asarray(np.asarray(arr).astype(target.dtype)))
    return config, model


def save_fla(model, config, path: str | os.PathLike, *, dtype=None) -> Path:
    """Writes ``model`` as an fla checkpoint directory: ``config.json`` (model_type ``gla``, architectures
    ``["GLAForCausalLM"]``) and ``model.safetensors`` that fla's ``GLAForCausalLM.from_pretrained`` and
    transformers' ``AutoModelForCausalLM`` (with fla imported) load.

    Args:
      model: our ``GLAForCausalLM``.
      config: its ``GLAConfig``.
      path: output directory (created; existing config.json / model.safetensors are overwritten).
      dtype: tensor dtype in the file ("float32", "bfloat16", "float16"; default: the parameters' own dtype).
    Returns the directory.
    """
    fla_config = config_to_fla(config)
    layout = fla_layout(config, fused_norm_gate=_fused_norm_gate(fla_config))
    mapped = {e.ours for e in layout.values()}
    missing = sorted(_param_paths(model) - mapped, key=str)
    if missing:
        raise ValueError(f"model: parameter {'.'.join(map(str, missing[0]))} has no fla counterpart")
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
        arr = np.asarray(_value(_get_variable(model, entry.ours)))
        if dtype is not None:
            arr = arr.astype(dtype)
        file_dtype = file_dtype or arr.dtype
        tensors[name] = _ours_to_fla(arr, entry)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    fla_config["dtype"] = np.dtype(file_dtype).name
    (path / CONFIG_NAME).write_text(json.dumps(fla_config, indent=2, sort_keys=True) + "\n")
    if (path / INDEX_NAME).exists():  # a stale shard index would shadow the new single file
        (path / INDEX_NAME).unlink()
    write_safetensors(tensors, path / WEIGHTS_NAME)
    return path


__all__ = ["load_fla", "save_fla", "read_safetensors", "write_safetensors", "config_from_fla", "config_to_fla",
           "fla_layout", "read_fla_config"]
