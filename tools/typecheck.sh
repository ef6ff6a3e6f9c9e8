#!/usr/bin/env bash
# Type-check the fleetlite namespace with mypy --strict.
# The folders agent/, sdk/, fleet/ and tools/ are mapped to fleetlite.* by setup.cfg's package_dir,
# which mypy cannot follow through setuptools' editable-install finder; so we lay out the same
# mapping as symlinks in .mypy_tree/ and check that.
set -euo pipefail
cd "$(dirname "$0")/.."
MYPY="${MYPY:-mypy}"
rm -rf .mypy_tree && mkdir -p .mypy_tree/fleetlite
for pkg in agent sdk fleet tools; do ln -s "../../$pkg" ".mypy_tree/fleetlite/$pkg"; done
MYPYPATH=.mypy_tree exec "$MYPY" --explicit-package-bases -p fleetlite "$@"
