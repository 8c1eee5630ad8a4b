"""The ``gla-jax`` command: ``gla-jax {train,eval,generate,convert,bench} [args...]``.

Each subcommand lives in its own module with a ``main(argv: list[str]) -> int``; it is imported only when chosen, so
``gla-jax generate`` does not load the training stack.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("gla_jax.train.cli", "train a GLA or Transformer++ language model (default: a small GLA on CPU)"),
    "eval": ("gla_jax.train.evaluate", "held-out loss/perplexity of a run or checkpoint, per position bucket"),
    "generate": ("gla_jax.generate_cli", "sample text from a checkpoint (O(1)-state decoding for GLA)"),
    "convert": ("gla_jax.convert_cli", "convert between fla/HF checkpoints and gla-jax (orbax) checkpoints"),
    "bench": ("gla_jax.bench_cli", "operator benchmark (experiments/bench_ops.py)"),
}


def _usage() -> str:
    lines = ["usage: gla-jax COMMAND [args...]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gla-jax: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
