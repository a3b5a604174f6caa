#!/usr/bin/env bash
# The test command: both lanes, each in its own environment (set up on first use):
#   modern: .venv (python3, requirements-dev.txt): Python 3.8 syntax check (vermin -t=3.8-), then the test suite;
#   course: .venv-course (Python 3.8, torch 1.12.1, timm 0.9.10... requirements-course.txt), the same test suite.
# `bash test.sh --lane modern|course` runs one lane; other arguments go to pytest (`bash test.sh -k tokenizer`).
# pytest runs on as many workers as there are cores, at most 2 (HW3_TEST_WORKERS overrides; 0 runs in one process).
# A third worker on 2 cores measured 5:35 against 6:05 for the course lane once, but 6:17 against 5:36 for the modern
# lane and 8:12 for the course lane on a fresh clone's disk: not kept.
# --dist loadfile keeps each module on one worker, its module fixtures built once (tests/conftest.py orders them).
# A passed test's tmp_path is removed when it ends, and a passed lane's whole temporary folder at its end (pytest's
# tmp_path_retention_policy=failed): the fault rows copy a finished run each, which would otherwise fill a small disk.
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
lanes="modern course"
if [ "${1:-}" = "--lane" ]; then
  lanes="${2:?--lane needs modern, course or all}"; shift 2
  [ "$lanes" = all ] && lanes="modern course"
fi
for lane in $lanes; do
  case "$lane" in modern|course) ;; *) echo "test.sh: unknown lane '$lane' (modern, course or all)" >&2; exit 2 ;; esac
  echo "== lane: $lane" >&2
  (
    export HW3_LANE="$lane"
    source "$root/setup_env.sh"
    cd "$HW3_ROOT"
    if [ "$lane" = modern ]; then
      echo "== vermin -t=3.8- (Python 3.8 compatibility)" >&2
      git ls-files -co --exclude-standard '*.py' | xargs "$HW3_VENV/bin/vermin" -t=3.8- --no-tips --violations --eval-annotations
    fi
    echo "== pytest ($("$HW3_PY" -c 'import sys, torch; print("Python %d.%d, torch %s" % (sys.version_info[:2] + (torch.__version__,)))'))" >&2
    workers="${HW3_TEST_WORKERS:-$(( $(nproc) < 2 ? $(nproc) : 2 ))}"
    "$HW3_PY" -m pytest -q -p no:cacheprovider -o tmp_path_retention_policy=failed -n "$workers" --dist loadfile \
      tests "$@"
  )
done
