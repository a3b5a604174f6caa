"""The course's decoder.py: GPT-2 with the added cross-attention, adapters, prefix and LoRA, loading
decoder_model.bin. The code is in hw3/models/gpt2.py; this file keeps the course's import names."""
from hw3.models.gpt2 import (ADAPTER_PLACES, BUFFERS_TO_DROP, CONV1D_WEIGHTS, GPT2_SMALL, HEAD_SIZE,  # noqa: F401
                             LORA_TARGETS, MLP, Adapter, Block, Config, CrossAttention, Decoder, DecoderWeightsError,
                             ImageMemory, KVCache, Prefix, SelfAttention, attend, count_parameters, infer_shape,
                             load_gpt2_weights, peft_config)
