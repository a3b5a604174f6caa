"""The captioner's parts: image encoders, decoders (GPT-2 with PEFT, GRU, attention GRU, Transformer), one search, CLIP."""
