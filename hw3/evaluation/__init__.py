"""Scoring captions: CIDEr, the standard metric table, CLIPScore, the PTB tokenizer."""
