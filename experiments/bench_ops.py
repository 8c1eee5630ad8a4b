"""Operator benchmark: chunk / recurrent / parallel / pallas GLA against causal softmax attention.

    python experiments/bench_ops.py --quick          # ~1-2 minutes on 2 CPU cores
    python experiments/bench_ops.py                  # T = 512 .. 16384, writes experiments/results/bench_ops_cpu.json

Same as ``gla-jax bench``; the implementation (flags, JSON layout, targets) is gla_jax/bench_cli.py.
"""

import sys

from gla_jax.bench_cli import main

if __name__ == "__main__":
    sys.exit(main())
