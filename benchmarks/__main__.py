"""`python -m warmstart.benchmarks`: the same as `warmstart bench`."""

import sys

from warmstart.benchmarks.harness import main

sys.exit(main())
