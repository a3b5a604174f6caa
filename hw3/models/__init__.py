"""The captioner's parts: image encoders, the decoders (GPT-2 with PEFT, GRU, attention GRU, Transformer) and
their registry, one search with its decoding settings, CLIP."""
