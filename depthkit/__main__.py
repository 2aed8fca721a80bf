"""`python -m depthkit`: the `depthkit` command."""

import sys

from depthkit.cli import main

sys.exit(main())
