#!/usr/bin/env bash
# Run the FleetLite demo, setting up the Python environment first. Needs no broker installed.
# Extra arguments go to `fleetlite demo`, e.g. tools/demo.sh --keep
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
exec .venv/bin/fleetlite demo "$@"
