#!/usr/bin/env bash
# The main command on the embedded default: sets up .venv, then runs the offline demo.
# (Until the miniature world lands, the demo captions a synthetic image with a randomly initialised tiny decoder,
# proving the environment and the model code run end to end offline.)
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$HW3_ROOT"
export HF_HUB_OFFLINE=1
exec "$HW3_PY" - <<'PY'
import torch
from decoder import Config, Decoder, peft_config
from tokenizer import BPETokenizer, END_TOKEN

torch.manual_seed(0)
decoder = Decoder(Config(n_layer=2, n_embd=128, block_size=64, encoder_dim=32, **peft_config("lora", lora_rank=4))).eval()
image_tokens = torch.randn(1, 5, 32)
memory, cache = decoder.image_memory(image_tokens), decoder.new_cache()
ids, token = [], torch.tensor([[END_TOKEN]])
with torch.no_grad():
    for _ in range(8):
        token = decoder(token, memory=memory, cache=cache)[:, -1:].argmax(-1)
        ids.append(int(token))
print("demo (placeholder): a random 2-layer decoder with LoRA, %d trainable parameters, greedy-decoded %r"
      % (decoder.parameter_summary()["trainable"], BPETokenizer().decode(ids)))
PY
