"""The ``gla-jax`` command: ``gla-jax {train,eval,generate,convert,bench} [args...]``.

Each subcommand is a module of this package with ``main(argv: list[str]) -> int``, imported only when chosen (so
``gla-jax generate`` does not load the training stack). A ``UserError`` (``gla_jax.errors``) anywhere below is printed
as one line, ``gla-jax <command>: error: <message>``, and the command exits with status 2.
"""

from __future__ import annotations

import functools
import importlib
import sys

from gla_jax.errors import UserError

COMMANDS = {
    "train": "train a GLA, Transformer++, RetNet, Mamba or Mamba2 language model (default: a small GLA on CPU)",
    "eval": "held-out loss/perplexity of a run or checkpoint, per position bucket",
    "generate": "sample text from a checkpoint (O(1)-state decoding for the recurrent families)",
    "convert": "convert between fla/HF checkpoints (every family) and gla-jax (orbax) checkpoints",
    "bench": "operator benchmark (experiments/bench_ops.py)",
}


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def command(prog: str):
    """Decorates a subcommand's ``main(argv)``: ``argv`` defaults to ``sys.argv[1:]``, and a UserError becomes
    ``<prog>: error: <one line>`` on stderr and exit status 2."""
    def wrap(fn):
        @functools.wraps(fn)
        def main(argv: list[str] | None = None, **options) -> int:
            try:
                return int(fn(sys.argv[1:] if argv is None else list(argv), **options) or 0)
            except UserError as e:
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                return 2
        return main
    return wrap


def _usage() -> str:
    lines = ["usage: gla-jax COMMAND [args...]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gla-jax: error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"gla_jax.cli.{name}")
    return int(module.main(rest) or 0)
