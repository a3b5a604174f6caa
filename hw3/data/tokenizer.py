"""GPT-2 byte-level BPE, built from the course's `encoder.json` and `vocab.bpe`.

Byte-level BPE never meets an unknown character: text is first turned into UTF-8 bytes, each byte is mapped to a
printable unicode character, and the merges learnt by GPT-2 are applied to those characters. Any string therefore
encodes, and decoding the ids gives the bytes (and so the text) back.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

import regex
from hw3 import REPO_ROOT

END_TOKEN = 50256
END_TEXT = "<|endoftext|>"

# GPT-2's pre-tokenisation: contractions, letter runs, digit runs, other symbols, each with at most one leading
# space; white space runs keep their last space for the following word.
WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (printable bytes map to themselves)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _pairs(word: Tuple[str, ...]) -> set:
    return set(zip(word[:-1], word[1:]))


class BPETokenizer:
    """Encodes text to GPT-2 token ids and back; `<|endoftext|>` in the text becomes the single id 50256."""

    def __init__(self, encoder_file: Optional[str] = None, vocab_file: Optional[str] = None):
        encoder_file = encoder_file or os.path.join(REPO_ROOT, "encoder.json")
        vocab_file = vocab_file or os.path.join(REPO_ROOT, "vocab.bpe")
        for path in (encoder_file, vocab_file):
            if not os.path.isfile(path):
                raise FileNotFoundError("BPE file not found: %s (expected GPT-2's encoder.json and vocab.bpe)" % path)
        with open(encoder_file, encoding="utf-8") as f:
            self.encoder: Dict[str, int] = json.load(f)
        with open(vocab_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]  # first line is a version comment
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.end_token = self.encoder.get(END_TEXT, END_TOKEN)
        self._cache: Dict[str, List[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> List[str]:
        """Merges the characters of one pre-tokenised word, lowest merge rank first."""
        parts = tuple(word)
        while len(parts) > 1:
            pair = min(_pairs(parts), key=lambda p: self.merge_rank.get(p, float("inf")))
            if pair not in self.merge_rank:
                break
            first, second = pair
            merged: List[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        return list(parts)

    def _encode_word(self, word: str) -> List[int]:
        ids = self._cache.get(word)
        if ids is None:
            chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids = [self.encoder[piece] for piece in self._bpe(chars)]
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for i, chunk in enumerate(text.split(END_TEXT)):
            if i > 0:
                ids.append(self.end_token)
            for word in WORD_PATTERN.findall(chunk):
                ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def shared_tokenizer() -> BPETokenizer:
    """One BPETokenizer of the repository's encoder.json and vocab.bpe for the whole process: building one reads
    both files (about 0.1 s), which a per-batch caller would pay at every batch."""
    return BPETokenizer()
