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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gla-jax convert", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-fla", metavar="DIR", help="fla/HF checkpoint directory (config.json + *.safetensors)")
    src.add_argument("--to-fla", metavar="CKPT", help="gla-jax checkpoint (convert output, workdir or step folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="--to-fla: tensor dtype in model.safetensors (default: the parameters' dtype, float32)")
    return p


def _find_model_config(ckpt: Path) -> dict:
    """Our model config dict (any registered family) from model_config.json / config.json in ckpt or up to three
    folders above it."""
    from gla_jax.models import families
    for folder in [ckpt, *list(ckpt.parents)[:3]]:
        for name in ("model_config.json", "config.json"):
            f = folder / name
            if f.is_file():
                try:
                    d = json.loads(f.read_text())
                except ValueError:
                    continue
                if isinstance(d, dict) and d.get("model_type") in families():
                    return d
                if isinstance(d, dict) and isinstance(d.get("model_config"), dict):
                    return d["model_config"]
    raise ValueError(f"--to-fla: no model config (model_config.json or config.json with a model_type of "
                     f"{'/'.join(families())}) in "
                     f"{ckpt} or the folders above it")


def from_fla(src: str | Path, out: str | Path) -> Path:
    """fla checkpoint directory -> gla-jax parameters (orbax) + config; returns ``out``."""
    from flax import nnx

    from gla_jax.convert import load_fla, load_hf, read_hf_config
    from gla_jax.train.checkpoint import save_params

    # the family named by config.json's model_type; fla files without one are GLA
    config, model = load_hf(src) if "model_type" in read_hf_config(src) else load_fla(src)
    out = Path(out)
    if out.exists() and (out / "params").exists():
        raise ValueError(f"--out: {out} already holds a checkpoint (params/); choose a new directory")
    state = nnx.state(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    save_params(out, params, config.to_dict())
    (out / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    return out


def to_fla(ckpt: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    """gla-jax checkpoint -> fla checkpoint directory; returns ``out``."""
    from flax import nnx

    from gla_jax.convert import save_hf
    from gla_jax.models import build_model, config_from_dict
    from gla_jax.train.checkpoint import load_params

    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise ValueError(f"--to-fla: no such path {ckpt}")
    config = config_from_dict(_find_model_config(ckpt.absolute()))
    model = nnx.eval_shape(lambda r: build_model(config, rngs=r), nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    target = nnx.to_pure_dict(state)
    restored = load_params(ckpt, target=target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return save_hf(model, out, config=config, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.from_fla is not None:
            if args.dtype is not None:
                raise ValueError("--dtype: only with --to-fla (gla-jax parameters are stored in float32)")
            out = from_fla(args.from_fla, args.out)
            print(f"wrote gla-jax checkpoint {out} (params/, config.json)")
        else:
            out = to_fla(args.to_fla, args.out, dtype=args.dtype)
            print(f"wrote fla checkpoint {out} (config.json, model.safetensors)")
    except ValueError as e:
        print(f"gla-jax convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
