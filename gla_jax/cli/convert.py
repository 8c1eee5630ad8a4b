"""``gla-jax convert``: fla/Hugging Face checkpoints of any registered model family (GLA, Transformer++, RetNet,
Mamba, Mamba2) <-> gla-jax orbax checkpoints.

    gla-jax convert --from-hf HF_DIR --out OUT          # HF/fla dir -> OUT/params (orbax) + OUT/config.json
    gla-jax convert --to-hf CKPT --out HF_DIR [--dtype bfloat16]

``--from-fla``/``--to-fla`` are the same options under their older names. The HF side is a directory with
``config.json`` (its ``model_type`` picks the family; a file without one is read as GLA) and ``model.safetensors``,
as ``gla_jax.convert.load_hf``/``save_hf`` read and write it: fla's names for GLA, Transformer++ and RetNet
(``<Family>ForCausalLM`` of fla), transformers' for Mamba and Mamba2 (``MambaForCausalLM``, ``Mamba2ForCausalLM``).
The gla-jax side uses ``gla_jax.train.checkpoint.save_params``/``load_params``: ``OUT/params`` is an orbax
StandardCheckpointer tree of the model's parameters (``nnx.state(model, nnx.Param)`` as a nested dict, float32) and
``OUT/config.json`` is our ``config.to_dict()`` (also written as ``OUT/model_config.json``, the name a training
workdir uses). ``--to-hf`` accepts such a folder, a training workdir (newest step), its ``checkpoints`` folder or a
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
    src.add_argument("--from-hf", "--from-fla", dest="from_hf", metavar="DIR",
                     help="fla/HF checkpoint directory (config.json + *.safetensors) of any registered family")
    src.add_argument("--to-hf", "--to-fla", dest="to_hf", metavar="CKPT",
                     help="gla-jax checkpoint (convert output, workdir or step folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="--to-hf: tensor dtype in model.safetensors (default: the parameters' dtype, float32)")
    return p


def from_hf(src: str | Path, out: str | Path, *, option: str = "--from-hf") -> Path:
    """fla/HF checkpoint directory (any registered family) -> gla-jax parameters (orbax) + config; returns ``out``."""
    from flax import nnx

    from gla_jax.convert import load_fla, load_hf, read_hf_config
    from gla_jax.train.checkpoint import save_params

    out = Path(out)
    if out.exists() and (out / "params").exists():
        raise UserError(f"--out: {out} already holds a checkpoint (params/); choose a new directory")
    try:  # the family named by config.json's model_type; fla files without one are GLA
        config, model = load_hf(src) if "model_type" in read_hf_config(src) else load_fla(src)
    except ValueError as e:  # the reader names the file or field; the user named the folder
        raise UserError(f"{option}: {one_line(e)}") from None
    state = nnx.state(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    save_params(out, params, config.to_dict())
    (out / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return out


def to_hf(ckpt: str | Path, out: str | Path, *, dtype: str | None = None, option: str = "--to-hf") -> Path:
    """gla-jax checkpoint of any registered family with an HF map -> fla/HF checkpoint directory (``save_hf``;
    refuses a non-empty ``out``); returns ``out``."""
    from gla_jax.convert import save_hf
    from gla_jax.train.load import load_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: {out} exists and is not an empty directory; choose a new directory")
    config, model = load_model(ckpt, option=option)
    try:
        return save_hf(model, out, config=config, dtype=dtype)
    except ValueError as e:  # a family without an HF map, a config option the HF format cannot hold
        raise UserError(f"{option}: {one_line(e)}") from None


# the older names (GLA only at first; now the same functions)
from_fla, to_fla = from_hf, to_hf


def _option(argv: list[str], names: tuple[str, ...]) -> str:
    """The spelling of an option the user typed (for error messages), e.g. ``--to-fla`` or ``--to-hf``."""
    for a in argv:
        for n in names:
            if a == n or a.startswith(n + "="):
                return n
    return names[0]


@command("gla-jax convert")
def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.from_hf is not None:
        if args.dtype is not None:
            raise UserError("--dtype: only with --to-hf (gla-jax parameters are stored in float32)")
        out = from_hf(args.from_hf, args.out, option=_option(argv, ("--from-hf", "--from-fla")))
        print(f"wrote gla-jax checkpoint {out} (params/, config.json)")
    else:
        out = to_hf(args.to_hf, args.out, dtype=args.dtype, option=_option(argv, ("--to-hf", "--to-fla")))
        kind = json.loads((out / "config.json").read_text()).get("model_type", "?")
        print(f"wrote {kind} HF checkpoint {out} (config.json, model.safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
