#!/usr/bin/env bash
# Check that a plain `pip install .` (the device agent) pulls in no fleet-side dependency and that
# the agent imports and starts there.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q .
"$tmp/venv/bin/python" -m pip list --format=freeze > "$tmp/installed.txt"
for forbidden in flatbuffers tflite= psycopg pytest mypy ruff; do
  if grep -qi "^$forbidden" "$tmp/installed.txt"; then
    echo "agent-only install pulled in a fleet-side/dev package: $forbidden" >&2
    cat "$tmp/installed.txt" >&2
    exit 1
  fi
done
cd "$tmp"
"$tmp/venv/bin/python" -c "import fleetlite.agent, fleetlite.sdk.runtime.interpreter as r; print('agent imports; backend', r.select_backend().name, r.select_backend().version)"
"$tmp/venv/bin/fleetlite-agent" --version
# the systemd unit ships with the package (docs/operator-guide.md copies it from there)
unit="$("$tmp/venv/bin/python" -c "import fleetlite.agent, pathlib; print(pathlib.Path(fleetlite.agent.__file__).parent / 'systemd/fleetlite-agent.service')")"
grep -q '^ExecStart=.*fleetlite-agent run' "$unit" || { echo "agent-only install: no systemd unit at $unit" >&2; exit 1; }
echo "agent-only install: OK ($(wc -l < "$tmp/installed.txt") packages: $(tr '\n' ' ' < "$tmp/installed.txt"))"
