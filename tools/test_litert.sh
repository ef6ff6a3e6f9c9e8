#!/usr/bin/env bash
# The runtime-facing tests again under ai-edge-litert, the TFLite runtime that gateways on
# Python 3.12+ get by default (tflite-runtime has no wheels there). On this Python it runs
# beside tflite-runtime in its own venv, .venv-litert, selected with FLEETLITE_RUNTIME.
# Extra arguments go to pytest. tools/test.sh runs this after the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/side_venv.sh
ensure_side_venv test_litert .venv-litert "${PYTHON:-python3}" litert,dev,fleet \
  "ai_edge_litert, sentencepiece, fleetlite.agent, pytest"
[ "${FLEETLITE_PASS:-}" != setup ] || exit 0  # tools/test.sh: the venv only, for now
echo "test_litert: the runtime-facing tests with FLEETLITE_RUNTIME=ai-edge-litert"
FLEETLITE_RUNTIME=ai-edge-litert .venv-litert/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_runtime.py tests/test_models.py tests/test_smoke_test.py tests/test_bundle.py \
  tests/test_profiler.py tests/test_model_service.py tests/test_local_api.py \
  tests/test_ota_install.py tests/test_agent_units.py tests/test_cli_basics.py \
  tests/test_generation.py tests/test_lm_contract.py tests/test_local_generate.py \
  tests/test_lm_install.py tests/test_generate_cli.py tests/test_lm_profile.py \
  tests/test_lm_fixtures.py \
  -k "not demo" "$@"
