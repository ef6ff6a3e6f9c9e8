"""``python -m fleetlite.tools.sim``: run the fleet simulator (see :mod:`fleetlite.tools.sim`)."""

from __future__ import annotations

import sys

from fleetlite.tools.sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
