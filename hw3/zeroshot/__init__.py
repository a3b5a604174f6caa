"""P1: zero-shot image classification with CLIP and prompt templates."""
