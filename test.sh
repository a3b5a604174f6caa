#!/usr/bin/env bash
# The test command: sets up .venv, checks Python 3.8 syntax with vermin, runs the test suite.
# Extra arguments go to pytest (e.g. `bash test.sh -k tokenizer`).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$HW3_ROOT"
echo "== vermin -t=3.8- (Python 3.8 compatibility)" >&2
git ls-files -co --exclude-standard '*.py' | xargs "$HW3_VENV/bin/vermin" -t=3.8- --no-tips --violations --eval-annotations
echo "== pytest" >&2
exec "$HW3_PY" -m pytest -q tests "$@"
