#!/usr/bin/env bash
# Fill .wheelhouse/ with every package FleetLite's venv needs, so that a fresh virtual
# environment can be made later without the network (the test that runs the README's demo
# command in a fresh venv uses it: PIP_NO_INDEX=1 PIP_FIND_LINKS=.wheelhouse). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f .wheelhouse/.stamp ] && [ "$(cat .wheelhouse/.stamp)" = "$want" ]; then
  exit 0
fi
echo "wheelhouse: downloading packages for offline venvs into .wheelhouse/" >&2
mkdir -p .wheelhouse
"$PY" -m pip download -q -d .wheelhouse pip 'setuptools>=64' wheel '.[dev,fleet,postgres,sim]' >&2
echo "$want" > .wheelhouse/.stamp
