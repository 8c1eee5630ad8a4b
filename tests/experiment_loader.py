"""Imports an experiment script (experiments/<name>.py) for the tests, under a private module name; the experiments
folder goes on sys.path first, since the scripts import their siblings (``common``, ``bench_ops``)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

EXP = pathlib.Path(__file__).resolve().parents[1] / "experiments"
if str(EXP) not in sys.path:
    sys.path.insert(0, str(EXP))


def load_experiment(name):
    """experiments/<name>.py as a fresh module ``_exp_<name>``."""
    spec = importlib.util.spec_from_file_location(f"_exp_{name}", EXP / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
