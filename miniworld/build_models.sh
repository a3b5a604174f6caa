#!/usr/bin/env bash
# Rebuilds the miniature world's "pretrained" models from scratch with their committed settings and seeds:
# miniworld/models/tiny_clip.pt (open_clip, config tiny_clip.json), miniworld/models/caption_vit.pt (timm ViT: the
# tiny CLIP's image tower fine-tuned densely, the captioners' encoder) and miniworld/models/decoder_model.bin (GPT-2).
# The PEFT captioners on top of them: python3 -m miniworld.train_captioners
# Each run is bounded (a few minutes on 2 cores when they are free); progress bars on stderr, timings at the end.
set -euo pipefail
source "$(dirname "$0")/../setup_env.sh"
cd "$HW3_ROOT"
start=$(date +%s)
"$HW3_PY" -m miniworld.train_clip
clip_done=$(date +%s)
"$HW3_PY" -m miniworld.train_vit --threads 2
vit_done=$(date +%s)
"$HW3_PY" -m miniworld.train_gpt2
end=$(date +%s)
echo "build_models: tiny CLIP $((clip_done - start)) s, tiny ViT $((vit_done - clip_done)) s," \
     "tiny GPT-2 $((end - vit_done)) s, total $((end - start)) s"
