#!/usr/bin/env bash
# Make sure a headless-capable Chromium is installed (tests/test_report.py renders the fleet report
# in it). Uses the distribution's package (Debian: `chromium`), never a browser download of a test
# tool. Prints the browser's path. Idempotent: does nothing when Chromium is already there.
#   tools/chromium.sh            # install if missing (root or sudo, apt-get)
set -euo pipefail

find_chromium() {
    for name in chromium chromium-browser; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if path="$(find_chromium)"; then
    echo "$path"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium.sh: Chromium is not installed and apt-get is unavailable; install Chromium" \
         "with this system's package manager" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "chromium.sh: need root (or sudo) to apt-get install chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "chromium.sh: installing chromium with apt-get" >&2
$SUDO apt-get update -qq >&2
# Fonts: the report names DejaVu/Liberation first; without them text renders as boxes.
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core \
    fonts-liberation >&2

if path="$(find_chromium)"; then
    "$path" --version >&2 || true
    echo "$path"
else
    echo "chromium.sh: apt-get finished but no chromium binary was found" >&2
    exit 1
fi
