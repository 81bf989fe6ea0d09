"""Ray entry points: `python -m jobs.generate` (the batch job)."""

import os
import sys

# A laptop run (no Ray address) keeps Ray on loopback. Ray reads this once, when it is first
# imported, so it must be set before any import of ray; on a cluster RAY_ADDRESS is set.
if "RAY_ADDRESS" not in os.environ and "--address" not in sys.argv:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
