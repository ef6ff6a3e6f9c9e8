#!/usr/bin/env bash
# The agent-facing tests again on Python 3.9, the oldest Python FleetLite supports and the one
# gateways on Debian 11 / Raspberry Pi OS bullseye have, in its own venv, .venv-py39.
# Python 3.9 is looked for as $PYTHON39, python3.9 on PATH, then pyenv's versions; without one
# the pass is skipped with a message (Debian 12+ has no python3.9 package).
# Extra arguments go to pytest. tools/test.sh runs this after the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."

is_py39() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' 2>/dev/null; }

PY39=""
for candidate in "${PYTHON39:-}" "$(command -v python3.9 || true)" \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9*/bin/python3.9 /usr/bin/python3.9; do
  if is_py39 "$candidate"; then PY39="$candidate"; break; fi
done
if [ -z "$PY39" ]; then
  [ "${FLEETLITE_PASS:-}" != setup ] || exit 0  # said when the pass runs
  echo "test_py39: SKIPPED: no Python 3.9 interpreter found (set PYTHON39=/path/to/python3.9)"
  exit 0
fi

if [ -e .venv-py39 ] && ! is_py39 .venv-py39/bin/python; then
  rm -rf .venv-py39  # made by another Python: start again
fi
source tools/side_venv.sh
ensure_side_venv test_py39 .venv-py39 "$PY39" dev,fleet "tflite_runtime, sentencepiece, fleetlite.agent, pytest"
[ "${FLEETLITE_PASS:-}" != setup ] || exit 0  # tools/test.sh: the venv only, for now
echo "test_py39: the agent-facing tests on $(.venv-py39/bin/python --version)"
.venv-py39/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_agent_units.py tests/test_agent_mqtt.py tests/test_spool.py tests/test_local_api.py \
  tests/test_model_service.py tests/test_runtime.py tests/test_profiler.py tests/test_chunks.py \
  tests/test_signing.py tests/test_bundle.py tests/test_smoke_test.py tests/test_ota_install.py \
  tests/test_ota_agent.py tests/test_ota_faults.py tests/test_broker_address.py tests/test_orphans.py \
  "$@"
