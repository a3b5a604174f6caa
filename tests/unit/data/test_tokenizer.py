"""tokenizer.BPETokenizer against transformers' GPT2Tokenizer built from the same encoder.json / vocab.bpe."""
from __future__ import annotations

import os

import pytest

from hw3.data.tokenizer import END_TOKEN, BPETokenizer
from hw3 import REPO_ROOT as ROOT


CORPUS = [
    "a kitchen with a sink and many cooking machines and a pot of food",
    "A man riding a wave on top of a surfboard.",
    "Two dogs play in the grass!!! Isn't it nice? They're happy; we'll see.",
    "I'd say you've got it, he's done, she'll go, they'd've... 'quoted' \"double\"",
    "   leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand \r\n windows",
    "numbers 1234567 3.14159 1,000,000 2nd 10th 0x1F",
    "café naïve résumé Zürich São Paulo œuvre",
    "日本語のキャプション 中文字幕 한국어",
    "emoji 🐶🐱 👍🏽 family 👨‍👩‍👧",
    "punctuation: (parens) [brackets] {braces} <angles> @at #hash $dollar %percent ^caret &amp *star",
    "under_score dash-dash em—dash en–dash ellipsis… «guillemets»",
    "<|endoftext|>",
    "<|endoftext|>a cat<|endoftext|>",
    "text before <|endoftext|> and after",
    "",
    " ",
    "a" * 300,
    "ALL CAPS CAPTION WITH A DOG",
    "mIxEd CaSe WoRdS",
]


@pytest.fixture(scope="module")
def ours():
    return BPETokenizer()


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Tokenizer(os.path.join(ROOT, "encoder.json"), os.path.join(ROOT, "vocab.bpe"))


@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_transformers(ours, reference, text):
    assert ours.encode(text) == reference.encode(text)


@pytest.mark.parametrize("text", CORPUS)
def test_decode_round_trips(ours, text):
    assert ours.decode(ours.encode(text)) == text


def test_end_token(ours):
    assert ours.encode("<|endoftext|>") == [END_TOKEN]
    assert ours.decode([END_TOKEN]) == "<|endoftext|>"
    assert ours.vocab_size == 50257


def test_course_example(ours, reference):
    prompt = "a kitchen with a sink and many cooking machines and a pot of food"
    assert ours.encode(prompt) == reference.encode(prompt)
    assert ours.decode(ours.encode(prompt)) == prompt


def test_random_byte_strings(ours, reference):
    import random

    rng = random.Random(0)
    alphabet = "abc XYZ 0123 .,;'!?-\n\t éü漢字🙂 's 't 're"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert ours.encode(text) == reference.encode(text), repr(text)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        BPETokenizer(str(tmp_path / "nope.json"), os.path.join(ROOT, "vocab.bpe"))
