#!/usr/bin/env bash
# Downloads the pretrained CLIP (P1), the image encoder and the trained checkpoint (P2). Run once, online.
# Every part is tried; a summary line per part ends the run; exit 1 if a part failed (see hw3_download.py).
# Only when asked: --cnn [NAME] also fetches a timm CNN encoder (default resnet101.tv2_in1k) for the classic captioners.
python3 "$(dirname "$0")/hw3_download.py" "$@"
