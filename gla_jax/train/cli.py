"""``gla-jax train [--config FILE.yaml] [--workdir DIR] [key=value ...]``.

With no arguments: trains the embedded default (a small GLA on the Python standard library's source files with
byte-level tokens, a few minutes on a laptop CPU) in ``./runs/default`` and prints a generated sample at the end.
On an existing workdir the run resumes from its newest complete checkpoint, with the workdir's saved config unless
``--config`` is given (``key=value`` overrides apply on top, e.g. ``train.steps=600`` to train longer).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

DEFAULT_WORKDIR = "runs/default"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gla-jax train",
        description="Train a GLA or Transformer++ language model. Sections: model.*, data.*, optim.*, mesh.*, "
                    "checkpoint.*, train.*, distributed.* (see experiments/configs/*.yaml).",
        epilog="examples:\n  gla-jax train\n  gla-jax train --config experiments/configs/gla-340m.yaml "
               "--workdir runs/gla340m data.source='data/*.jsonl' data.tokenizer=tokenizer.json mesh.fsdp=8\n"
               "  gla-jax train --workdir runs/default train.steps=600",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: the embedded CPU default)")
    p.add_argument("--workdir", default=None, help=f"run directory (default: {DEFAULT_WORKDIR})")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3")
    return p


def resolve(args) -> tuple:
    """(Config, workdir) from parsed arguments (the workdir's saved config is the base when resuming)."""
    from gla_jax.train import config as config_lib

    workdir = Path(args.workdir or DEFAULT_WORKDIR)
    base = args.config
    if base is None and (workdir / "config.yaml").is_file():
        base = workdir / "config.yaml"
    cfg = config_lib.load_config(base, args.overrides)
    return cfg, workdir


def _is_user_error(e: Exception) -> bool:
    """A ValueError about the configuration or data (its message starts with the key it names)."""
    import re

    from gla_jax.errors import UserError

    return isinstance(e, UserError) or bool(re.match(r"^-?-?[A-Za-z_]+(\.[A-Za-z_]+)*[:\s]", str(e)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    from gla_jax.train import config as config_lib

    try:
        cfg, workdir = resolve(args)
    except ValueError as e:
        print(f"gla-jax train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_lib.dump_yaml(cfg), end="")
        return 0

    from gla_jax.train import distributed

    try:
        distributed.initialize(cfg.distributed)
    except ValueError as e:
        print(f"gla-jax train: error: {e}", file=sys.stderr)
        return 2
    import jax

    from gla_jax.train import loop

    t0 = time.time()
    try:
        trainer = loop.Trainer(cfg, workdir)
    except ValueError as e:
        if not _is_user_error(e):
            raise
        print(f"gla-jax train: error: {e}", file=sys.stderr)
        return 2
    is_main = jax.process_index() == 0
    from gla_jax.errors import UserError
    from gla_jax.train import run_dir

    try:  # one run per workdir: a resume must keep the saved settings; nothing is written before this passes
        run_dir.prepare_run_dir(workdir, cfg, trainer.mcfg.to_dict(), is_main=is_main)
    except UserError as e:
        print(f"gla-jax train: error: {e}", file=sys.stderr)
        return 2
    if is_main:
        print(f"workdir: {workdir}  (metrics.jsonl, tensorboard/, checkpoints/, config.yaml)", flush=True)
    from gla_jax.train import watchdog

    try:
        out = watchdog.run_guarded(trainer.run)  # a peer lost mid-collective: one line naming it, not a traceback
    except loop.TrainingError as e:
        print(f"gla-jax train: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        if not _is_user_error(e):
            raise
        print(f"gla-jax train: error: {e}", file=sys.stderr)
        return 2
    losses = out["losses"]
    if is_main:
        if losses:
            steps = sorted(losses)
            tail = steps[-min(len(steps), max(cfg.train.log_every, 1)):]
            last = sum(losses[s] for s in tail) / len(tail)
            msg = (f"trained steps {steps[0]}..{steps[-1]}: loss {losses[steps[0]]:.4f} (step {steps[0]}) -> "
                   f"{last:.4f} (mean of steps {tail[0]}..{tail[-1]})")
            if out["eval_loss"] is not None:
                msg += f"; held-out loss {out['eval_loss']:.4f} (ppl {math.exp(min(out['eval_loss'], 50)):.2f})"
            print(msg + f"; {time.time() - t0:.0f} s", flush=True)
        elif out["start_step"] >= cfg.train.steps:
            print(f"run in {workdir} already finished at step {out['start_step']} (train.steps={cfg.train.steps}); "
                  "pass train.steps=N to train longer or use another --workdir", flush=True)
    if out["stopped_by_signal"]:
        watchdog.finished()  # peers stop watching this process
        return 0
    if cfg.train.sample_tokens > 0:
        text = loop.sample(trainer, out["params"], cfg.train.sample_prompt, cfg.train.sample_tokens,
                           temperature=cfg.train.sample_temperature, seed=cfg.train.seed)
        if is_main and text is not None:
            print(f"--- sample ({cfg.train.sample_tokens} tokens, temperature {cfg.train.sample_temperature}) ---")
            print(cfg.train.sample_prompt + text)
            print("---", flush=True)
    watchdog.finished()
    return 0


if __name__ == "__main__":
    sys.exit(main())
