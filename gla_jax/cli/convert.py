"""``gla-jax convert``: fla/HF checkpoints (any registered model family: GLA, Transformer++) <-> gla-jax orbax
checkpoints.

    gla-jax convert --from-fla FLA_DIR --out OUT        # fla dir -> OUT/params (orbax) + OUT/config.json
    gla-jax convert --to-fla CKPT --out FLA_DIR [--dtype bfloat16]

The gla-jax side uses ``gla_jax.train.checkpoint.save_params``/``load_params``: ``OUT/params`` is an orbax
StandardCheckpointer tree of the model's parameters (``nnx.state(model, nnx.Param)`` as a nested dict, float32) and
``OUT/config.json`` is our ``config.to_dict()`` (also written as ``OUT/model_config.json``, the name a training
workdir uses). ``--to-fla`` accepts such a folder, a training workdir (newest step), its ``checkpoints`` folder or a
step folder; the model config is read from ``model_config.json`` or ``config.json`` beside or above it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gla_jax.cli import command, one_line
from gla_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gla-jax convert", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-fla", metavar="DIR", help="fla/HF checkpoint directory (config.json + *.safetensors)")
    src.add_argument("--to-fla", metavar="CKPT", help="gla-jax checkpoint (convert output, workdir or step folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="--to-fla: tensor dtype in model.safetensors (default: the parameters' dtype, float32)")
    return p


def from_fla(src: str | Path, out: str | Path) -> Path:
    """fla checkpoint directory -> gla-jax parameters (orbax) + config; returns ``out``."""
    from flax import nnx

    from gla_jax.convert import load_fla, load_hf, read_hf_config
    from gla_jax.train.checkpoint import save_params

    out = Path(out)
    if out.exists() and (out / "params").exists():
        raise UserError(f"--out: {out} already holds a checkpoint (params/); choose a new directory")
    try:  # the family named by config.json's model_type; fla files without one are GLA
        config, model = load_hf(src) if "model_type" in read_hf_config(src) else load_fla(src)
    except ValueError as e:  # the reader names the file or field; the user named the folder
        raise UserError(f"--from-fla: {one_line(e)}") from None
    state = nnx.state(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    save_params(out, params, config.to_dict())
    (out / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return out


def to_fla(ckpt: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    """gla-jax checkpoint -> fla checkpoint directory (refuses a non-empty ``out``); returns ``out``."""
    from gla_jax.convert import save_fla
    from gla_jax.train.load import load_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: {out} exists and is not an empty directory; choose a new directory")
    config, model = load_model(ckpt, option="--to-fla")
    if config.model_type != "gla":
        raise UserError(f"--to-fla: {ckpt} holds a {config.model_type} model; only GLA models convert to fla")
    try:
        return save_fla(model, config, out, dtype=dtype)
    except ValueError as e:
        raise UserError(f"--to-fla: {one_line(e)}") from None


@command("gla-jax convert")
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.from_fla is not None:
        if args.dtype is not None:
            raise UserError("--dtype: only with --to-fla (gla-jax parameters are stored in float32)")
        out = from_fla(args.from_fla, args.out)
        print(f"wrote gla-jax checkpoint {out} (params/, config.json)")
    else:
        out = to_fla(args.to_fla, args.out, dtype=args.dtype)
        print(f"wrote fla checkpoint {out} (config.json, model.safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
