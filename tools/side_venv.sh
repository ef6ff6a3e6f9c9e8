# Sourced by the extra test passes (tools/test_litert.sh, tools/test_py39.sh): a venv of their own
# beside .venv, created and filled on first use and reused after.
# ensure_side_venv TAG DIR PYTHON EXTRAS PROBE: create DIR with PYTHON if it has no python, and
# install fleetlite[EXTRAS] (editable) into it when `import PROBE` fails there.
ensure_side_venv() {
  local tag="$1" dir="$2" python="$3" extras="$4" probe="$5"
  if [ ! -x "$dir/bin/python" ]; then
    echo "$tag: creating $dir"
    "$python" -m venv "$dir"
  fi
  if ! "$dir/bin/python" -c "import $probe" 2>/dev/null; then
    echo "$tag: installing fleetlite[$extras] into $dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q -e ".[$extras]"
  fi
}
