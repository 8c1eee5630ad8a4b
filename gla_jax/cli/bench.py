"""``gla-jax bench``: runs the operator benchmark ``experiments/bench_ops.py`` (flags: ``gla-jax bench --help``).

The benchmark lives with the other experiments in the repository checkout; this command finds it next to the
installed package (an editable install or a checkout on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gla_jax.cli import command
from gla_jax.errors import UserError

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench_ops.py"


def load_benchmark():
    """The ``experiments/bench_ops.py`` module; UserError when the package is not run from a checkout."""
    if not SCRIPT.is_file():
        raise UserError(f"bench: needs the repository checkout ({SCRIPT} is missing); install gla-jax with "
                        "`pip install -e .` from a clone")
    spec = importlib.util.spec_from_file_location("bench_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@command("gla-jax bench")
def main(argv: list[str]) -> int:
    return load_benchmark().main(argv)
