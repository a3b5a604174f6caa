#!/usr/bin/env bash
# The main command on the embedded default: sets up .venv, then runs the whole bundle offline on the miniature
# world (python3 -m miniworld.demo): P1 with a tiny CLIP, short P2 training runs, inference with the converged PEFT
# checkpoints, evaluation, P3 attention maps, results.json / results.md / report.pdf in outputs/demo/.
# Options go to miniworld.demo (--out DIR, --small, --skip-training, --seed N).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$HW3_ROOT"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$HW3_PY" -m miniworld.demo "$@"
