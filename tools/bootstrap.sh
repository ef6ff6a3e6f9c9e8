#!/usr/bin/env bash
# Set up what FleetLite needs on a Debian-like machine, from nothing; safe to run again.
#   tools/bootstrap.sh            Python venv (.venv) with fleetlite[dev,fleet,postgres,sim] installed editable
#   tools/bootstrap.sh --system   also the system services the test suite uses (Mosquitto)
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM=0
for arg in "$@"; do
  case "$arg" in
    --system) SYSTEM=1 ;;
    *) echo "bootstrap: unknown option $arg (use --system)" >&2; exit 2 ;;
  esac
done

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
APT_UPDATED=0
apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "bootstrap: please install these packages with your package manager: $*" >&2
    exit 1
  fi
  if [ "$APT_UPDATED" = 0 ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "bootstrap: installing python3-venv"
  apt_install python3-venv
fi

if [ "$SYSTEM" = 1 ]; then
  missing=()
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v jq >/dev/null || missing+=(jq)  # docs/sdk.md's CI script uses it (and its test)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}"
    apt_install "${missing[@]}"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.fleetlite-installed"
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing fleetlite[dev,fleet,postgres,sim] into .venv (first run takes a minute)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev,fleet,postgres,sim]'
  echo "$want" > "$stamp"
fi
