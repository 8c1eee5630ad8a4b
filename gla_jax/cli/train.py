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

from gla_jax.cli import command, one_line

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


@command("gla-jax train")
def main(argv: list[str], *, hooks=()) -> int:
    """``hooks``: extra ``(fn, every)`` pairs for the run (``Trainer.add_hook``), for programmatic callers."""
    args = _parser().parse_args(argv)
    from gla_jax.train import config as config_lib

    cfg, workdir = resolve(args)
    if args.print_config:
        print(config_lib.dump_yaml(cfg), end="")
        return 0

    from gla_jax.train import distributed

    distributed.initialize(cfg.distributed)
    import jax

    from gla_jax.train import trainer as trainer_lib

    t0 = time.time()
    trainer = trainer_lib.Trainer(cfg, workdir)
    for fn, every in hooks:
        trainer.add_hook(fn, every=every)
    is_main = jax.process_index() == 0
    # One run per workdir: a resume must keep the saved settings; nothing is written before this passes.
    trainer_lib.save_resolved_config(cfg, workdir, trainer.mcfg, is_main=is_main)
    if is_main:
        print(f"workdir: {workdir}  (metrics.jsonl, tensorboard/, checkpoints/, config.yaml)", flush=True)
    from gla_jax.train import watchdog

    try:
        out = watchdog.run_guarded(trainer.run)  # a peer lost mid-collective: one line naming it, not a traceback
    except trainer_lib.TrainingError as e:
        print(f"gla-jax train: error: {one_line(e)}", file=sys.stderr)
        return 1
    if is_main:
        print(summary_line(out, cfg, workdir, time.time() - t0), flush=True)
    watchdog.finished()  # peers stop watching this process
    if out["stopped_by_signal"] or cfg.train.sample_tokens <= 0:
        return 0
    if out["step"] == 0:
        if is_main:
            print("no sample: the model has not been trained (train.steps=0); set train.steps to a positive number",
                  flush=True)
        return 0
    if jax.process_count() > 1:
        if is_main:
            print(f"no sample in a multi-process run; try: gla-jax generate --checkpoint {workdir} "
                  f"--prompt {cfg.train.sample_prompt!r}", flush=True)
        return 0
    text = sample(trainer, out["params"], cfg)
    if is_main:
        print(f"--- sample ({cfg.train.sample_tokens} tokens, temperature {cfg.train.sample_temperature}) ---")
        print(cfg.train.sample_prompt + text)
        print("---", flush=True)
    return 0


def summary_line(out: dict, cfg, workdir, seconds: float) -> str:
    """One line on what this invocation trained (or that the run had already finished)."""
    losses = out["losses"]
    if not losses:
        if out["start_step"] >= cfg.train.steps and out["start_step"] > 0:
            return (f"run in {workdir} already finished at step {out['start_step']} (train.steps={cfg.train.steps}); "
                    "pass train.steps=N to train longer or use another --workdir")
        return f"no training steps run (train.steps={cfg.train.steps})"
    steps = sorted(losses)
    tail = steps[-min(len(steps), max(cfg.train.log_every, 1)):]
    last = sum(losses[s] for s in tail) / len(tail)
    msg = (f"trained steps {steps[0]}..{steps[-1]}: loss {losses[steps[0]]:.4f} (step {steps[0]}) -> "
           f"{last:.4f} (mean of steps {tail[0]}..{tail[-1]})")
    if out["eval_loss"] is not None:
        msg += f"; held-out loss {out['eval_loss']:.4f} (ppl {math.exp(min(out['eval_loss'], 50)):.2f})"
    return msg + f"; {seconds:.0f} s"


def sample(trainer, params, cfg) -> str:
    """``train.sample_tokens`` tokens after ``train.sample_prompt`` with ``gla_jax.generate`` (stops at EOS)."""
    from gla_jax.generate import generate

    tok = trainer.tokenizer
    ids = [int(i) for i in tok.encode(cfg.train.sample_prompt)] or [tok.eos_id]
    out = generate(trainer.local_model(params), [ids], max_new_tokens=cfg.train.sample_tokens,
                   temperature=cfg.train.sample_temperature, stop_tokens=(tok.eos_id,), seed=cfg.train.seed + 1234)
    return tok.decode([t for t in out.sequences()[0] if t != tok.eos_id])
