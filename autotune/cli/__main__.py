"""`python -m autotune.cli`: the same command as `autotune`."""

import sys

from autotune.cli.main import app

sys.exit(app())
