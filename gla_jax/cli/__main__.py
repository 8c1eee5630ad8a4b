"""``python -m gla_jax.cli COMMAND ...`` (the same as ``gla-jax COMMAND ...``)."""

import sys

from gla_jax.cli import main

sys.exit(main())
