#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and installs a requirements file into it. Source it: afterwards $HW3_PY
# is the environment's python. Re-installs only when the requirements files changed.
#   default (our stack):        .venv         from python3    with requirements-dev.txt
#   HW3_LANE=course (grader's): .venv-course  from Python 3.8 with requirements-course.txt
set -euo pipefail
HW3_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HW3_LANE="${HW3_LANE:-modern}"
find_python38() {
  local candidate
  for candidate in "$(pyenv root 2>/dev/null)"/versions/3.8*/bin/python3.8 "$(command -v python3.8 2>/dev/null)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c 'import sys, venv; assert sys.version_info[:2] == (3, 8)' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
case "$HW3_LANE" in
  modern)
    HW3_VENV="${HW3_VENV:-$HW3_ROOT/.venv}"; requirements="$HW3_ROOT/requirements-dev.txt"; base_python=python3 ;;
  course)
    HW3_VENV="${HW3_COURSE_VENV:-$HW3_ROOT/.venv-course}"; requirements="$HW3_ROOT/requirements-course.txt"
    base_python="$(find_python38)" || {
      echo "setup: the course lane needs Python 3.8 (pyenv's 3.8.x or python3.8 on PATH) and found neither" >&2
      exit 2
    } ;;
  *) echo "setup: HW3_LANE must be modern or course, got '$HW3_LANE'" >&2; exit 2 ;;
esac
stamp_of() { cat "$HW3_ROOT"/requirements*.txt | sha256sum | cut -d' ' -f1; }
if [ ! -x "$HW3_VENV/bin/python" ]; then
  echo "setup: creating $HW3_VENV ($("$base_python" --version 2>&1))" >&2
  "$base_python" -m venv "$HW3_VENV"
fi
if [ "$(cat "$HW3_VENV/.hw3-stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
  echo "setup: installing $(basename "$requirements") into $HW3_VENV (a few minutes the first time)" >&2
  if ! "$HW3_VENV/bin/python" -m pip install --disable-pip-version-check -r "$requirements" >"$HW3_VENV/pip.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$HW3_VENV/pip.log" | tail -n 20 >&2
    echo "setup: installing $requirements failed (whole log: $HW3_VENV/pip.log)" >&2
    exit 1
  fi
  if [ "$HW3_LANE" = course ] && ! "$HW3_VENV/bin/python" -m pip install --disable-pip-version-check --no-deps \
      -r "$HW3_ROOT/requirements-course-nodeps.txt" >>"$HW3_VENV/pip.log" 2>&1; then
    echo "setup: installing requirements-course-nodeps.txt failed (log: $HW3_VENV/pip.log)" >&2
    exit 1
  fi
  stamp_of > "$HW3_VENV/.hw3-stamp"
fi
HW3_PY="$HW3_VENV/bin/python"
export HW3_ROOT HW3_VENV HW3_PY HW3_LANE
