"""Caption files and their splits, images, the GPT-2 BPE tokenizer and the feature cache."""
