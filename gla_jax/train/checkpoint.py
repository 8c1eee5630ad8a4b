"""Orbax checkpoints of a training run, and ``save_params``/``load_params`` for other tools.

A training checkpoint (``<workdir>/checkpoints/<step>/``) holds four items:
  ``params``     the model parameters (an ``nnx.State`` of float32 arrays, sharded),
  ``opt_state``  the optax state,
  ``meta``       JSON: step, RNG key data, tokens seen, number of data shards,
  ``data``       the grain iterator state, one JSON file per data shard (written by the process that owns it).
Orbax writes each step into a temporary directory and renames it when every process has finished, so a partially
written checkpoint (a killed run, a full disk) is never listed; a listed step that has the expected parameter
shapes but still fails to load is moved aside to ``checkpoints/damaged/`` and the previous one is used
(``checkpoint_guard``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gla_jax.errors import UserError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# data-iterator state: one JSON file per data shard

class DataStateHandler(ocp.CheckpointHandler):
    """Saves ``{"shard_<s>": state}`` as ``shard_<s>.json``; every process writes the shards it owns and restores
    the ones it asks for, so a run may resume with another process count if the shard count is kept."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for key, state in args.state.items():
            (directory / f"{key}.json").write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None):
        directory = epath.Path(directory)
        out = {}
        for key in (args.keys if args is not None and args.keys else ()):
            f = directory / f"{key}.json"
            if not f.exists():
                raise UserError(f"data state: {f} is missing (checkpoint saved with another data.num_shards?)")
            out[key] = json.loads(f.read_text())
        return out

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    keys: tuple = ()


# ----------------------------------------------------------------------------------------------------------------
# the training checkpointer

def _abstract(tree):
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, tree)


class Checkpointer:
    """``CheckpointManager`` over ``directory`` keeping the last ``keep`` steps; async by default."""

    ITEMS = ("params", "opt_state", "meta", "data")

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts, item_names=self.ITEMS)

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, params, opt_state, meta: dict, data_state: dict, *, force: bool = True) -> bool:
        """Starts saving (async: returns once arrays are copied to host memory)."""
        ok = self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta), data=DataStateSave(data_state)), force=force)
        return bool(ok)

    def restore(self, step: int, abstract_params, abstract_opt_state, data_keys=()):
        """Restores onto the shardings given by the abstract trees (any mesh); returns
        ``(params, opt_state, meta, data_state)``."""
        res = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(abstract_params)),
            opt_state=ocp.args.StandardRestore(_abstract(abstract_opt_state)),
            meta=ocp.args.JsonRestore(), data=DataStateRestore(tuple(data_keys))))
        return res.params, res.opt_state, res.meta, res.data

    def restore_latest(self, abstract_params, abstract_opt_state, data_keys=(), verify=None):
        """The newest step that loads and passes ``verify`` (damaged ones are moved aside to ``damaged/``, see
        ``checkpoint_guard``); None if there is none. UserError if the saved parameters belong to another model."""
        from gla_jax.train.checkpoint_guard import restore_newest_good

        return restore_newest_good(self, abstract_params, abstract_opt_state, data_keys, verify=verify)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------------------------------------------
# parameters only (for generate / convert)

def find_params_dir(path: Path) -> Path:
    """Accepts a workdir, its ``checkpoints`` folder, a step folder, or a params folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint_dir: no such path {str(path)!r}")
    if (path / "params").is_dir():
        return path / "params"
    if (path / "_METADATA").exists() or (path / "_CHECKPOINT_METADATA").exists():
        return path
    ck = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(p.name), p) for p in ck.iterdir() if p.is_dir() and p.name.isdigit())
    if not steps:
        raise UserError(f"checkpoint_dir: no checkpoint found in {str(path)!r}")
    return steps[-1][1] / "params"


def load_params(checkpoint_dir: str | Path, target=None, *, as_numpy: bool = False):
    """Loads parameters saved by training (newest step) or by ``save_params``.

    Args:
      checkpoint_dir: a workdir, its ``checkpoints`` folder, a step folder or a ``save_params`` folder.
      target: optional abstract/concrete tree (e.g. ``nnx.state(model, nnx.Param)``) giving structure, dtypes and
        shardings; without it a nested dict of arrays on the default device (numpy if ``as_numpy``) is returned,
        layer indices as ints, ready for ``nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), tree)``.
    """
    pdir = find_params_dir(Path(checkpoint_dir)).absolute()
    if target is not None:
        from gla_jax.train import checkpoint_guard as guard

        guard.check_params_match(pdir, target, "")  # another model: one line (the caller names the path)
        with guard.captured_noise():
            ckptr = ocp.StandardCheckpointer()
            try:
                return ckptr.restore(pdir, _abstract(target))
            finally:
                ckptr.close()
    ckptr = ocp.PyTreeCheckpointer()
    try:
        meta = ckptr.metadata(pdir)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)

        def arg(m):
            if as_numpy:
                return ocp.RestoreArgs(restore_type=np.ndarray)
            return ocp.ArrayRestoreArgs(sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))

        restore_args = jax.tree.map(arg, tree)
        return _int_keys(ckptr.restore(pdir, args=ocp.args.PyTreeRestore(restore_args=restore_args)))
    finally:
        ckptr.close()


def _int_keys(tree):
    """orbax stores list indices (layer numbers) as strings; give them back as ints (as ``nnx.State`` has them)."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def save_params(directory: str | Path, params, config: dict | None = None) -> Path:
    """Writes ``params`` (an ``nnx.State`` or nested dict of arrays) to ``directory/params`` with orbax, and
    ``config`` (e.g. the model config as a dict) to ``directory/config.json``; ``load_params(directory)`` reads it."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(params, "to_pure_dict"):
        params = params.to_pure_dict()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory / "params", params, force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return directory


def pure_dict(tree) -> Any:
    """``nnx.State`` -> nested dict of arrays (unchanged if already plain)."""
    return tree.to_pure_dict() if hasattr(tree, "to_pure_dict") else tree
