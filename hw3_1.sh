#!/bin/bash
# P1: zero-shot CLIP classification. $1 image folder, $2 id2label.json, $3 output CSV.
python3 "$(dirname "$0")/p1_clip_zeroshot.py" "$1" "$2" "$3"
