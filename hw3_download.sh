#!/usr/bin/env bash
# Downloads the pretrained CLIP (P1), the image encoder and the trained checkpoint (P2). Run once, online.
python3 "$(dirname "$0")/hw3_download.py" "$@"
