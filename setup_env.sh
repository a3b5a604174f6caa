#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs requirements-dev.txt into it.
# Source it: afterwards $HW3_PY is the environment's python. Re-installs only when a requirements file changed.
set -euo pipefail
HW3_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HW3_VENV="${HW3_VENV:-$HW3_ROOT/.venv}"
stamp_of() { cat "$HW3_ROOT/requirements.txt" "$HW3_ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1; }
if [ ! -x "$HW3_VENV/bin/python" ]; then
  echo "setup: creating $HW3_VENV" >&2
  python3 -m venv "$HW3_VENV"
fi
if [ "$(cat "$HW3_VENV/.hw3-stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
  echo "setup: installing requirements-dev.txt into $HW3_VENV (a few minutes the first time)" >&2
  "$HW3_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HW3_ROOT/requirements-dev.txt" >&2
  stamp_of > "$HW3_VENV/.hw3-stamp"
fi
HW3_PY="$HW3_VENV/bin/python"
export HW3_ROOT HW3_VENV HW3_PY
