"""hw3: CLIP zero-shot classification, image captioning with a frozen encoder and decoder, and attention maps.

The course's scripts at the repository's top parse their arguments and call this package:
  zeroshot/    P1: prompt templates and the CLIP zero-shot classifier
  models/      the captioner: image encoders, the GPT-2 and from-scratch decoders, one search, CLIP, downloads
  data/        caption files and splits, the image loader, the GPT-2 tokenizer, the feature cache
  training/    the training run, its loop and SCST with the CIDEr-D reward
  inference/   captioning a folder of images
  evaluation/  CIDEr, the standard metric table, CLIPScore, the PTB tokenizer
  attention/   P3: cross-attention figures
  pipeline/    run_all's stages, their records and the opt-in stages
  report/      results into report.md and report.pdf
  util/        errors, atomic files, safe loading, the device, resources
"""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the course's files: encoder.json, vocab.bpe
