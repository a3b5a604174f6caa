#!/usr/bin/env bash
# Fetches the homework data (hw3_data: p1_data, p2_data with decoder_model.bin, p3_data) for students.
# Needs the internet and gdown (pip install gdown). Writes hw3_data/ beside this script; skips if it is there.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -d "$here/hw3_data/p2_data" ]; then
  echo "hw3_data already present in $here" >&2
  exit 0
fi
command -v gdown >/dev/null || { echo "error: gdown not found (pip install gdown)" >&2; exit 2; }
gdown 11rP6KmR5Qwjhx0rfag0b5TZGBTRuPtQR -O "$here/hw3_data.zip"
unzip -q "$here/hw3_data.zip" -d "$here"
rm "$here/hw3_data.zip"
echo "hw3_data ready in $here/hw3_data" >&2
