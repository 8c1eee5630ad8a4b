"""The model of a training run: its config from the ``model`` section, and building it (docs/design.md §6).

Everything in the trainer that depends on the model family goes through ``model_config`` and ``build_model``.
"""

from __future__ import annotations

from flax import nnx

from gla_jax.train import config as config_lib


def model_config(cfg: config_lib.Config, tokenizer_vocab: int | None = None):
    """The model config for ``cfg.model`` (``model.arch``: a registered family; preset + overrides);
    ``train.compute_dtype`` and ``train.remat`` fill ``dtype``/``remat`` unless set explicitly. ConfigError naming
    ``model.<key>``."""
    from gla_jax.models.registry import PRESETS, config_field_types, get_config, get_family

    try:
        cls = get_family(cfg.model.arch).config_class
    except ValueError as e:
        raise config_lib.ConfigError(f"model.arch: {e}") from None
    ov = dict(cfg.model.overrides)
    if cfg.model.preset:
        if cfg.model.preset not in PRESETS:
            raise config_lib.ConfigError(f"model.preset: unknown preset {cfg.model.preset!r} "
                                         f"(known: {', '.join(sorted(PRESETS))})")
        cls = PRESETS[cfg.model.preset][0]
        expected = cls.model_type
        if cfg.model.arch != expected:
            raise config_lib.ConfigError(f"model.arch: preset {cfg.model.preset!r} is a {expected} model, "
                                         f"but model.arch is {cfg.model.arch!r}")
    type_hints = config_field_types(cls)
    names = set(type_hints)
    for key, value in list(ov.items()):
        if key not in names:
            raise config_lib.ConfigError(f"model.{key}: unknown key for {cls.__name__}{_preset_hint(cfg)}")
        ov[key] = config_lib.coerce(f"model.{key}", value, type_hints[key])
    ov.setdefault("dtype", cfg.train.compute_dtype)
    ov.setdefault("remat", cfg.train.remat)
    try:
        mcfg = get_config(cfg.model.preset, **ov) if cfg.model.preset else cls(**ov)
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(f"model: {e}{_preset_hint(cfg)}") from None
    if tokenizer_vocab is not None and mcfg.vocab_size < tokenizer_vocab:
        raise config_lib.ConfigError(f"model.vocab_size: {mcfg.vocab_size} is smaller than the tokenizer's "
                                     f"vocabulary ({tokenizer_vocab})")
    return mcfg


def build_model(mcfg, seed: int):
    """The NNX model for ``mcfg`` with parameters initialised from ``seed``."""
    from gla_jax.models import build_model as _build

    return _build(mcfg, rngs=nnx.Rngs(seed))


def _preset_hint(cfg: config_lib.Config) -> str:
    """For another family without a preset: the embedded default's model.* sizes are GLA's, so say which presets
    give the family a consistent starting point."""
    from gla_jax.models.registry import PRESETS

    if cfg.model.preset or cfg.model.arch == config_lib.ModelSection.arch:
        return ""
    names = sorted(n for n, (c, _) in PRESETS.items() if getattr(c, "model_type", None) == cfg.model.arch)
    if not names:
        return ""
    pick = next((n for n in names if n.endswith("-tiny")), names[0])
    return f" (the default model.* sizes are GLA's; start from a preset, e.g. model.preset={pick})"
