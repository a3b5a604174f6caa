#!/usr/bin/env bash
# P2: bash hw3_2.sh IMG_DIR OUT_JSON DECODER_WEIGHTS  ->  OUT_JSON = {image file name without extension: caption}
python3 "$(dirname "${BASH_SOURCE[0]}")/p2_inference.py" "$1" "$2" "$3"
