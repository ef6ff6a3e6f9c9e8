#!/usr/bin/env bash
# Run FleetLite's whole test suite (the same one CI runs), setting up what it needs first:
# the Python venv, Mosquitto, a throw-away PostgreSQL cluster, headless Chromium and a local
# wheelhouse (so the demo test can build a fresh venv offline). Then the runtime-facing tests
# again under ai-edge-litert (tools/test_litert.sh) and the agent-facing tests on Python 3.9
# (tools/test_py39.sh, when a Python 3.9 is installed), side by side.
# Extra arguments go to pytest and skip those two passes, e.g. tools/test.sh -k runtime
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh --system
bash tools/chromium.sh >/dev/null
bash tools/wheelhouse.sh
FLEETLITE_TEST_PG_URL="${FLEETLITE_TEST_PG_URL:-$(bash tools/postgres.sh)}"
export FLEETLITE_TEST_PG_URL
# Two workers by default, files kept together (their module fixtures are built once):
# most tests wait on brokers, agents and subprocesses. FLEETLITE_TEST_WORKERS=0 runs serially.
WORKERS="${FLEETLITE_TEST_WORKERS:-2}"
if [ "$WORKERS" = 0 ]; then
  .venv/bin/python -m pytest "$@"
else
  .venv/bin/python -m pytest -n "$WORKERS" --dist loadfile "$@"
fi
if [ "$#" -eq 0 ]; then
  # The two extra passes run side by side (each mostly waits on its own interpreter and
  # subprocesses); their venvs are made first, one after the other, as pip builds in this tree.
  FLEETLITE_PASS=setup bash tools/test_litert.sh
  FLEETLITE_PASS=setup bash tools/test_py39.sh
  logs="$(mktemp -d)"
  bash tools/test_litert.sh > "$logs/litert.log" 2>&1 & litert=$!
  bash tools/test_py39.sh > "$logs/py39.log" 2>&1 & py39=$!
  status=0
  wait "$litert" || status=1
  wait "$py39" || status=1
  cat "$logs/litert.log" "$logs/py39.log"
  rm -rf "$logs"
  exit "$status"
fi
