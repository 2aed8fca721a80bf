"""`python -m depthkit`: the `depthkit` command."""

import sys

from depthkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
