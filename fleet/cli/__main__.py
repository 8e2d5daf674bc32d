"""`python -m edgeinfer.fleet.cli`: the same as the `edge-fleet` console script."""

import sys

from edgeinfer.fleet.cli import main

sys.exit(main())
