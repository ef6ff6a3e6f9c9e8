#!/usr/bin/env bash
# Run FleetLite's whole test suite (the same one CI runs), setting up what it needs first.
# Extra arguments go to pytest, e.g. tools/test.sh -k runtime
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh --system
exec .venv/bin/python -m pytest "$@"
