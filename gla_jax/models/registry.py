"""The registry of model families: every place that needs to know "which kind of model is this" asks it.

A family is a config class, a causal-LM class (the shared decoder backbone with the family's token mixer), the
``model_type`` names it has in fla/Hugging Face ``config.json`` files, a FLOP counter for its token mixer, its named
presets and, optionally, the map between its parameters and fla/HF tensor names. Adding a family is one new file (the
config, the mixer, the causal-LM subclass) plus one line::

    register_family(Family("gla", GLAConfig, GLAForCausalLM, mixer_flops=gla_mixer_flops, presets={...}))

``build_model``, the trainer (config resolution, FLOP counting), generation, conversion and the command line consult
the registry instead of branching on the model type (docs/design.md §4).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    name: the family's ``model_type`` (our ``config.json``, ``model.arch`` in the trainer's config).
    config_class: a ``ModelConfig`` subclass (frozen dataclass) whose ``model_type`` is ``name``.
    model_class: the causal LM, ``model_class(config, rngs=...)``; a ``CausalLM`` subclass (shared backbone).
    mixer_flops: ``(config, seq_len) -> float``: forward FLOPs per token of ONE layer's token mixer (its
      projections and operator); the backbone adds the MLP and the output head (gla_jax.train.flops).
    presets: preset name -> field values of ``config_class``.
    hf_model_types: the ``model_type`` values of fla/HF ``config.json`` files this family reads (default: name).
    hf_layout: ``(config, raw_hf_config_or_None) -> {hf tensor name: HFTensor}``, the parameter map used by
      ``gla_jax.convert.load_hf``/``save_hf``; None when the family has no fla/HF counterpart.
    """

    name: str
    config_class: type
    model_class: type
    mixer_flops: Callable[[Any, int], float]
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    hf_model_types: tuple[str, ...] = ()
    hf_layout: Callable[..., dict] | None = None

    def __post_init__(self):
        if getattr(self.config_class, "model_type", None) != self.name:
            raise ValueError(f"config_class: {self.config_class.__name__}.model_type must be {self.name!r}")
        if not self.hf_model_types:
            object.__setattr__(self, "hf_model_types", (self.name,))


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where one fla/HF tensor lives in our model.

    ours: attribute path of the parameter, e.g. ``("model", "layers", "attn", "q_proj", "kernel")``; layer: the
    index on the stacked layer axis (None for parameters outside the layers); kind: "linear" (torch ``[out, in]``
    <-> our ``[in, out]``), "conv" (torch ``[C, 1, W]`` <-> our ``[C, W]``) or "plain"; shape: in the HF file."""

    ours: tuple
    layer: int | None
    kind: str
    shape: tuple

    @staticmethod
    def decoder_layout(config, per_layer, *, mlp_width: int, vocab: int) -> dict[str, "HFTensor"]:
        """The whole map of a backbone model (fla names ``model.embeddings``, ``model.layers.{i}.*``,
        ``model.norm``, ``lm_head``) from the family's per-layer mixer entries ``(hf suffix, our path under the
        block, kind, hf shape)``; the block's norms and SwiGLU MLP are added here."""
        D, I = config.hidden_size, mlp_width
        rows = list(per_layer) + [
            ("mlp_norm.weight", ("mlp_norm", "weight"), "plain", (D,)),
            ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "linear", (I, D)),
            ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "linear", (I, D)),
            ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "linear", (D, I))]
        return HFTensor._model_layout(config, "model", "norm", rows, vocab)

    @staticmethod
    def backbone_layout(config, per_layer, *, vocab: int) -> dict[str, "HFTensor"]:
        """The whole map of a transformers Mamba/Mamba2-style model (``backbone.embeddings``,
        ``backbone.layers.{i}.norm`` and ``.mixer.*``, ``backbone.norm_f``, ``lm_head``): blocks of one norm and
        the mixer, no MLP. ``per_layer``: the mixer's entries ``(hf suffix after "mixer.", our path under
        ``attn``, kind, hf shape)``."""
        D = config.hidden_size
        rows = [("norm.weight", ("attn_norm", "weight"), "plain", (D,))]
        rows += [("mixer." + name, ("attn",) + tuple(path), kind, shape) for name, path, kind, shape in per_layer]
        return HFTensor._model_layout(config, "backbone", "norm_f", rows, vocab)

    @staticmethod
    def _model_layout(config, prefix: str, final_norm: str, rows, vocab: int) -> dict[str, "HFTensor"]:
        """The map both layouts share: ``{prefix}.embeddings``, ``{prefix}.layers.{i}.*`` from the per-layer
        ``rows`` (hf suffix, our path under the block, kind, hf shape), ``{prefix}.{final_norm}`` and ``lm_head``
        when untied (our paths: ``model.embeddings``, ``model.layers``, ``model.norm``, ``lm_head``)."""
        D = config.hidden_size
        out = {f"{prefix}.embeddings.weight": HFTensor(("model", "embeddings", "embedding"), None, "plain", (vocab, D))}
        for i in range(config.num_hidden_layers):
            for name, path, kind, shape in rows:
                out[f"{prefix}.layers.{i}.{name}"] = HFTensor(("model", "layers") + tuple(path), i, kind, tuple(shape))
        out[f"{prefix}.{final_norm}.weight"] = HFTensor(("model", "norm", "weight"), None, "plain", (D,))
        if not config.tie_word_embeddings:
            out["lm_head.weight"] = HFTensor(("lm_head", "kernel"), None, "linear", (vocab, D))
        return out


_FAMILIES: dict[str, Family] = {}
# Preset name -> (config class, fields), kept in step with the registered families (``get_config`` reads it).
PRESETS: dict[str, tuple[type, dict[str, Any]]] = {}


def register_family(family: Family) -> Family:
    """Adds ``family`` (and its presets); ValueError if its name, an hf model_type or a preset name is taken."""
    if family.name in _FAMILIES:
        raise ValueError(f"family: {family.name!r} is already registered")
    taken = {t: f.name for f in _FAMILIES.values() for t in f.hf_model_types}
    for t in family.hf_model_types:
        if t in taken:
            raise ValueError(f"hf_model_types: {t!r} already belongs to family {taken[t]!r}")
    for p in family.presets:
        if p in PRESETS:
            raise ValueError(f"presets: preset {p!r} already exists")
    _FAMILIES[family.name] = family
    for p, fields in family.presets.items():
        PRESETS[p] = (family.config_class, dict(fields))
    return family


def unregister_family(name: str) -> None:
    """Removes a family and its presets (tests register temporary ones)."""
    family = _FAMILIES.pop(name)
    for p in family.presets:
        PRESETS.pop(p, None)


def families() -> tuple[str, ...]:
    """The registered family names, in registration order."""
    return tuple(_FAMILIES)


def get_family(name: str) -> Family:
    """The family called ``name``; ValueError listing the registered ones otherwise."""
    if name not in _FAMILIES:
        raise ValueError(f"model_type: unknown model family {name!r}; registered: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_of(config_or_model) -> Family:
    """The family of a config, a model (anything with ``.config``) or a config class."""
    obj = getattr(config_or_model, "config", config_or_model)
    cls = obj if isinstance(obj, type) else type(obj)
    for family in _FAMILIES.values():
        if issubclass(cls, family.config_class) and family.config_class.model_type == getattr(cls, "model_type", None):
            return family
    raise ValueError(f"config: {cls.__name__} is not the config of a registered model family "
                     f"({', '.join(_FAMILIES)})")


def family_for_hf(model_type: str) -> Family:
    """The family that reads fla/HF ``config.json`` files with this ``model_type``."""
    for family in _FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in _FAMILIES.values() for t in f.hf_model_types)
    raise ValueError(f"model_type: no model family reads {model_type!r} checkpoints; known: {', '.join(known)}")


def build_model(config, *, rngs):
    """The causal LM of ``config``'s family."""
    return family_of(config).model_class(config, rngs=rngs)


def get_config(name: str, **overrides):
    """The preset ``name`` (see ``PRESETS``) as its family's config, with field ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"name: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    cls, fields = PRESETS[name]
    names = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
        if key not in names:
            raise ValueError(f"{cls.__name__}: unknown config key {key!r}")
    return cls(**{**fields, **overrides})


def config_from_dict(d: Mapping[str, Any], **overrides):
    """A config from our ``config.to_dict()`` form (or an fla/HF dict with a registered ``model_type``), dispatching
    on ``d["model_type"]`` (default "gla")."""
    if not isinstance(d, Mapping):
        raise ValueError(f"config: expected a mapping, got {type(d).__name__}")
    kind = d.get("model_type", "gla")
    family = _FAMILIES.get(kind) or family_for_hf(kind)
    return family.config_class.from_dict({k: v for k, v in d.items() if k != "model_type"}, **overrides)


def resolve_config(spec, *, arch: str | None = None, **overrides):
    """A config from a preset name, a dict (``config_from_dict``) or a config; ``arch`` (a family name), when
    given, must match; ``overrides`` are field values, strings coerced to the field's type by the caller."""
    if isinstance(spec, str):
        config = get_config(spec, **overrides)
    elif isinstance(spec, Mapping):
        config = config_from_dict({"model_type": arch or spec.get("model_type", "gla"), **spec}, **overrides)
    elif spec is None:
        config = get_family(arch or "gla").config_class(**overrides)
    else:
        config = spec.replace(**overrides) if overrides else spec
    if arch is not None and config.model_type != arch:
        raise ValueError(f"arch: {spec!r} is a {config.model_type} model, not {arch!r}")
    return config


def paper_presets(family: str, *, heads_340m: int, heads_1_3b: int) -> dict[str, dict[str, Any]]:
    """The presets of an fla decoder family (GLA, RetNet, Transformer++) at the GLA paper's sizes, all with 24 layers
    and the 32,000-token vocabulary: ``{family}-340m`` (1024 wide, tied embeddings) and ``{family}-1.3b`` (2048 wide,
    untied), with the given head counts; and the small CPU models ``{family}-tiny`` (64 wide, 2 layers, 2 heads) and
    ``{family}-small`` (256 wide, 4 layers, 4 heads), tied, with the byte tokenizer's 257 ids padded to 320
    (override with ``get_config(name, vocab_size=...)``)."""
    return {
        f"{family}-340m": dict(hidden_size=1024, num_hidden_layers=24, num_heads=heads_340m, vocab_size=32000,
                               tie_word_embeddings=True),
        f"{family}-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_heads=heads_1_3b, vocab_size=32000,
                               tie_word_embeddings=False),
        f"{family}-tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=320,
                               tie_word_embeddings=True),
        f"{family}-small": dict(hidden_size=256, num_hidden_layers=4, num_heads=4, vocab_size=320,
                                tie_word_embeddings=True),
    }


def config_field_types(config_class) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config class (for the trainer's string coercion)."""
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


__all__ = ["Family", "HFTensor", "PRESETS", "build_model", "config_field_types", "config_from_dict", "families", "family_for_hf",
           "family_of", "get_config", "get_family", "paper_presets", "register_family", "resolve_config",
           "unregister_family"]
