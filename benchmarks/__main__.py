"""`python -m warmstart.benchmarks`: the same as `warmstart bench`."""

import sys

from warmstart.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
