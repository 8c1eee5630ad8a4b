"""Loading a saved model: find its config up the folder tree, build it, restore its parameters (docs/design.md §6).

A *checkpoint path* is a training run directory (its newest step), its ``checkpoints`` folder, one step folder, or a
``save_params``/``gla-jax convert --from-hf`` folder. The model config is ``model_config.json`` (written by
training and conversion) or ``config.json`` in that folder or up to three folders above it; a run's training config
(``config.yaml``: tokenizer, data) is found the same way. ``gla-jax eval``, ``generate`` and ``convert`` all load
through ``load_model``.
"""

from __future__ import annotations

import json
from pathlib import Path

from gla_jax.errors import UserError

LEVELS = 4  # the folder itself and up to three above it


def find_upwards(start: Path, names, levels: int = LEVELS) -> Path | None:
    """The first file named one of ``names`` in ``start`` (or its folder, for a file) or a folder above it."""
    d = start if start.is_dir() else start.parent
    for _ in range(levels):
        for n in names:
            if (d / n).is_file():
                return d / n
        if d.parent == d:
            break
        d = d.parent
    return None


def config_from_dict(d: dict):
    """A model config from its ``to_dict()`` form, the family chosen by ``model_type`` through the model registry."""
    from gla_jax.models import config_from_dict as from_registry
    from gla_jax.models import families

    kind = d.get("model_type", "gla")
    if kind not in families():
        raise UserError(f"model_type: unsupported {kind!r} (registered families: {', '.join(families())})")
    return from_registry(d)


def find_model_config_file(path: str | Path, option: str = "--checkpoint") -> tuple[Path, dict] | None:
    """``(file, dict)``: the ``model_config.json`` or ``config.json`` (with a ``model_type``) saved with the
    checkpoint at ``path`` (see the module docstring), or None when there is none."""
    path = Path(path).absolute()
    for folder in [path, *list(path.parents)[:LEVELS - 1]]:
        for name in ("model_config.json", "config.json"):
            f = folder / name
            if not f.is_file():
                continue
            try:
                d = json.loads(f.read_text())
            except ValueError:
                raise UserError(f"{option}: {f} is not valid JSON") from None
            if isinstance(d, dict) and isinstance(d.get("model_config"), dict):
                d = d["model_config"]
            if isinstance(d, dict) and isinstance(d.get("model_type"), str):
                return f, d
    return None


def find_model_config(path: str | Path, option: str = "--checkpoint"):
    """The model config saved with the checkpoint at ``path`` (see the module docstring); UserError naming
    ``option`` when there is none or its ``model_type`` is not a registered family."""
    found = find_model_config_file(path, option)
    if found is None:
        raise UserError(f"{option}: no model_config.json or config.json (with a model_type) in or above "
                        f"{str(Path(path).absolute())!r}")
    return config_from_file(*found, option)


def config_from_file(file: Path, d: dict, option: str):
    """``config_from_dict(d)`` for the dict read from ``file``; a refused config is a UserError naming ``option``
    and ``file`` (and, through the config's own message, the field)."""
    try:
        return config_from_dict(d)
    except UserError as e:
        raise UserError(f"{option}: {file}: {e}") from None
    except (ValueError, TypeError) as e:  # a field the config class refuses: its message names the field
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{option}: {file}: {first}") from None


def find_run_config(path: str | Path):
    """The training config (``config.yaml``) of the run that ``path`` belongs to, or None."""
    f = find_upwards(Path(path).absolute(), ["config.yaml"])
    if f is None:
        return None
    from gla_jax.train.config import load_config

    return load_config(f)


def load_model(path: str | Path, *, config=None, dtype: str | None = None, mesh=None, option: str = "--checkpoint"):
    """(config, NNX model) from the checkpoint at ``path`` with its parameters restored (float32, as saved).

    ``config``: the model config to build (default: the one found with the checkpoint); ``dtype`` overrides the
    compute dtype; with ``mesh`` the parameters are laid out by their logical sharding names on it
    (``gla_jax.train.sharding``), else on the first device. UserError naming ``option`` for a missing path, config
    or checkpoint, or parameters that do not fit the config."""
    import jax
    from flax import nnx

    from gla_jax.models import build_model
    from gla_jax.train import checkpoint as ckpt_lib
    from gla_jax.train import sharding as shard_lib
    from gla_jax.train.step import raw_values

    path = Path(path)
    if not path.exists():
        raise UserError(f"{option}: no such path {str(path)!r}")
    config = config or find_model_config(path, option)
    if dtype:
        config = config.replace(dtype=dtype)
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, raw_values(params))
    else:
        shardings = shard_lib.state_shardings(params, mesh)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), raw_values(params),
                          shardings)
    try:
        restored = ckpt_lib.load_params(path, target=target)
    except UserError as e:
        raise UserError(f"{option}: {str(e).split(': ', 1)[-1]}") from None
    except (ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{option}: the parameters in {str(path)!r} do not fit the model config found with them "
                        f"({first[:200]})") from None
    for (key, want), got in zip(jax.tree_util.tree_leaves_with_path(target), jax.tree.leaves(restored)):
        if tuple(got.shape) != tuple(want.shape):
            raise UserError(f"{option}: parameter {jax.tree_util.keystr(key)} has shape {tuple(got.shape)} in "
                            f"{str(path)!r}, the config found with it expects {tuple(want.shape)}")
    if jax.tree.leaves(rest):  # non-parameter state (today's models have none): a freshly built model's
        _, _, rest = nnx.split(build_model(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
        return config, nnx.merge(graphdef, restored, rest)
    return config, nnx.merge(graphdef, restored)
