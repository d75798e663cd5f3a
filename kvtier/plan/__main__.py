"""`python -m kvtier.plan ...`: the same as `kvtier plan ...`."""

import sys

from kvtier.plan.cli import main

sys.exit(main(sys.argv[1:]))
