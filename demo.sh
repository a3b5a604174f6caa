#!/usr/bin/env bash
# The main command on the embedded default: sets up .venv, then runs the student's one command (run_all.py) offline
# on the miniature world (python3 -m miniworld.demo): the world in the course's layout, P1 with a tiny CLIP, short
# P2 training runs, the converged PEFT checkpoints scored, decoding tuned, P3 attention maps, the world-only measures,
# results.json / results.md / report.pdf in outputs/demo/. Rerunning skips the finished stages.
# Options go to miniworld.demo (--out DIR, --small, --seed N; run_all.py options after --, e.g. -- --force p2).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$HW3_ROOT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$HW3_PY" -m miniworld.demo "$@"
