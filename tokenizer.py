"""The course's tokenizer.py: GPT-2's byte-level BPE over encoder.json and vocab.bpe. The code is in
hw3/data/tokenizer.py; this file keeps the course's import names."""
from hw3.data.tokenizer import END_TEXT, END_TOKEN, WORD_PATTERN, BPETokenizer, bytes_to_unicode  # noqa: F401
