"""PyTorch layer state dicts (numpy arrays) into the baseline NNX layers, and back.

PyTorch ``nn.Linear`` weights are ``[out, in]`` where ``nnx.Linear`` kernels are ``[in, out]``; depthwise
``nn.Conv1d`` weights are ``[C, 1, W]`` where ours are ``[C, W]`` (same tap order: the last tap reads the current
token). Names are those of transformers' ``MambaMixer`` / ``Mamba2Mixer`` and fla's ``MultiScaleRetention``; a
prefix (for example ``"backbone.layers.0.mixer."``) selects one layer of a model's state dict.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# kinds: "linear" ([out, in] <-> [in, out]), "conv" ([C, 1, W] <-> [C, W]), "plain"


def _linear(table, torch_name, ours, module, bias):
    if module is None:
        return
    table[f"{torch_name}.weight"] = ((ours, "kernel"), "linear")
    if bias and getattr(module, "bias", None) is not None:
        table[f"{torch_name}.bias"] = ((ours, "bias"), "plain")


def _conv(table, name, module):
    if module is None:
        return
    table[f"{name}.weight"] = ((name, "weight"), "conv")
    if module.bias is not None:
        table[f"{name}.bias"] = ((name, "bias"), "plain")


def layer_layout(layer) -> dict:
    """{torch parameter name: ((our attribute path), kind)} for a MambaMixer, Mamba2Mixer or MultiScaleRetention."""
    from gla_jax.layers.mamba import MambaMixer
    from gla_jax.layers.mamba2 import Mamba2Mixer
    from gla_jax.layers.retention import MultiScaleRetention

    t: dict = {}
    if isinstance(layer, MambaMixer):
        for n in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            _linear(t, n, n, getattr(layer, n), True)
        _conv(t, "conv1d", layer.conv1d)
        t["A_log"], t["D"] = (("A_log",), "plain"), (("D",), "plain")
    elif isinstance(layer, Mamba2Mixer):
        for n in ("in_proj", "out_proj"):
            _linear(t, n, n, getattr(layer, n), True)
        _conv(t, "conv1d", layer.conv1d)
        for n in ("dt_bias", "A_log", "D"):
            t[n] = ((n,), "plain")
        t["norm.weight"] = (("norm_weight",), "plain")
    elif isinstance(layer, MultiScaleRetention):
        for n in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj"):
            _linear(t, n, n, getattr(layer, n), False)
        for n in ("q_conv1d", "k_conv1d", "v_conv1d"):
            _conv(t, n, getattr(layer, n))
        if layer.g_norm.weight is not None:
            t["g_norm.weight"] = (("g_norm", "weight"), "plain")
    else:
        raise ValueError(f"layer: expected a MambaMixer, Mamba2Mixer or MultiScaleRetention, got "
                         f"{type(layer).__name__}")
    return t


def _variable(layer, path):
    obj = layer
    for p in path:
        obj = getattr(obj, p)
    return obj


def _aliases(state_dict: dict, layer) -> dict:
    """fla stores the retention norm weight as ``g_norm_swish_gate.weight`` when norm and gate are fused."""
    out = dict(state_dict)
    if "g_norm_swish_gate.weight" in out and "g_norm.weight" not in out:
        out["g_norm.weight"] = out.pop("g_norm_swish_gate.weight")
    return out


def load_layer_weights(layer, state_dict: dict, prefix: str = "") -> None:
    """Copies a PyTorch layer's weights (``{name: numpy array}``, names after ``prefix``) into ``layer`` in place.

    Raises ValueError (naming the parameter) for a missing weight, an unexpected one, or a shape mismatch.
    """
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    sd = _aliases(sd, layer)
    layout = layer_layout(layer)
    missing = sorted(set(layout) - set(sd))
    if missing:
        raise ValueError(f"state_dict: missing {prefix}{missing[0]} (and {len(missing) - 1} more)"
                         if len(missing) > 1 else f"state_dict: missing {prefix}{missing[0]}")
    unexpected = sorted(set(sd) - set(layout))
    if unexpected:
        raise ValueError(f"state_dict: unexpected {prefix}{unexpected[0]} for {type(layer).__name__} "
                         f"({len(unexpected)} unexpected in all)")
    for name, (path, kind) in layout.items():
        arr = np.asarray(sd[name])
        if kind == "linear":
            arr = arr.T
        elif kind == "conv":
            if arr.ndim != 3 or arr.shape[1] != 1:
                raise ValueError(f"state_dict: {prefix}{name} expected shape [C, 1, W], got {arr.shape}")
            arr = arr[:, 0, :]
        var = _variable(layer, path)
        target = var[...]
        if arr.shape != target.shape:
            raise ValueError(f"state_dict: {prefix}{name} has shape {np.asarray(sd[name]).shape}, expected one "
                             f"mapping to {target.shape}")
        value = jnp.asarray(arr.astype(target.dtype))
        if hasattr(var, "set_value"):
            var.set_value(value)
        else:
            var.value = value


def layer_state_dict(layer, prefix: str = "") -> dict:
    """The inverse of :func:`load_layer_weights`: ``{prefix + torch name: float32 numpy array}`` in PyTorch layout
    (the retention norm weight under ``g_norm.weight``)."""
    out = {}
    for name, (path, kind) in layer_layout(layer).items():
        arr = np.asarray(_variable(layer, path)[...], np.float32)
        if kind == "linear":
            arr = arr.T
        elif kind == "conv":
            arr = arr[:, None, :]
        out[prefix + name] = np.ascontiguousarray(arr)
    return out
