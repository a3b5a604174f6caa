"""ptb: the Python PTB tokenisation equals pycocoevalcap's Java PTBTokenizer (CoreNLP 3.4.1), line for line."""
from __future__ import annotations

import os
import random
import shutil

import pytest

from hw3.evaluation import ptb

HAVE_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason="java not installed: the reference PTBTokenizer needs it")

# Captions the way people write them, plus what PTBLexer treats specially.
CAPTIONS = [
    "A man riding a wave on top of a surfboard.", "a dog's toy isn't there, it's people's", "I don't know; can't won't",
    "THE CAT SAT ON THE MAT!", "two-year-old boy in a T-shirt", "state-of-the-art kitchen -- very clean",
    "it costs $5.50 or 1,000.5 dollars (maybe)", "a sign reads \"STOP\" and 'go'", "wait... what?! ...", "U.S. flag",
    "e.g. a cat, i.e. a pet", "Mr. Smith & Co. etc. in the U.S. A man", "I. The end", "3/4 cup, 1 1/2 spoons, ½ pie",
    "at 12:30 on 5/12/2012", "a man w/ a hat and/or a coat", "café naïve Zoë niño façade", "a 🐶 dog 😀",
    "rock 'n' roll in the '90s", "o'clock y'all ma'am", "cannot gonna wanna gotta", "'twas 'tis", "C++ and C# code",
    "photo.jpg readme.txt", "www.google.com http://x.com/a foo@bar.com @user #tag", ":) ;-) :D <3", "<b>bold</b>",
    "a [bracket] {brace}", "AT&T R&B &amp; S&P-500", "the 1950's and 50s", "a\u00a0non breaking space",
    "tabs\tand  double  spaces ", "\u201ccurly\u201d \u2018quotes\u2019 don\u2019t", "em\u2014dash en\u2013dash",
    "ellipsis\u2026 done", "soft\u00adhyphen", "x-ray e-mail F-16 COVID-19 B-52", "9am 5pm 2x4 4x4 10x",
    "ph.d. Ph.D Jr. Sr. Bros. St. Mt. Ave. Jan. Inc. Ltd. Calif. ca. fig. pp.", "no. 5 No.5 No. 5", "", "   ",
    "Straße İstanbul ΑΒΓ", "a --- b ---- c ----- d", "x^2 ^_^ o_O -_- (^_^)", "->", "<< >> => ++",
    "-LRB- -lrb- &lt; &gt; &quot; &apos; &nbsp;", "a.", "A.", "z.", "dog.", "dog!", "dog?", "dog...",
]


def fuzz_captions(n: int, seed: int) -> list:
    """Random strings over the characters PTBLexer's rules care about (no line separators, which would shift the
    lines on both sides alike and hide differences)."""
    chars = list("abcdeABCDE xyzXYZ  0123456789.,;:!?'\"`-_/\\()[]{}<>@#$%^&*+=~|\t\u00a0…—–’‘“”«»½²°€£¢¥éñç日😀\u00ad")
    chars += ["&amp;", "&lt;", "&quot;", "&apos;", "n't", "'s", "http://", "www.", ".com", "U.S.", "etc.", "Mr.",
              "The ", "A ", "cannot", "dog", " a ", "."]
    rng = random.Random(seed)
    return ["".join(rng.choice(chars) for _ in range(rng.randint(0, 25))) for _ in range(n)]


def caption_like(n: int, seed: int) -> list:
    """Captions recombined from the pieces of CAPTIONS, with odd spacing, case and trailing punctuation."""
    pieces = [p for caption in CAPTIONS for p in caption.split(" ") if p]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = "".join(rng.choice(pieces) + rng.choice([" ", " ", " ", "", "  "]) for _ in range(rng.randint(1, 12)))
        text += rng.choice([".", " .", "..", "!", "", "?"])
        out.append(text.capitalize() if rng.random() < 0.3 else text)
    return out


def java_tokenize(lines):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(lines)})
    return [out[i][0] for i in range(len(lines))]


@needs_java
def test_ptb_tokenize_equals_java_ptbtokenizer():
    """HW3_PTB_CORPUS=N (default 1000) sets how many caption-like and fuzz lines are compared."""
    n = int(os.environ.get("HW3_PTB_CORPUS", "1000"))
    lines = CAPTIONS + caption_like(n, seed=0) + fuzz_captions(n, seed=0)
    expected = java_tokenize(lines)
    got = ptb.ptb_tokenize_lines(lines)
    mismatches = [(line, e, g) for line, e, g in zip(lines, expected, got) if e != g]
    assert not mismatches, mismatches[:5]
    for line, e in zip(CAPTIONS, expected):  # the single-caption entry point agrees where context does not matter
        if not line.rstrip().endswith("."):
            assert ptb.ptb_tokenize(line) == e


def test_ptb_tokenize_known_outputs_follow_penn_treebank():
    # Independent of Java: the PTB conventions the CIDEr tokenisation is known for.
    assert ptb.ptb_tokenize("A Dog's toy isn't there.") == "a dog 's toy is n't there"
    assert ptb.ptb_tokenize("(really) \"great\"...") == "-lrb- really -rrb- great"
    assert ptb.ptb_tokenize("cannot") == "can not"


def test_fast_path_equals_full_rule_scan():
    for line in CAPTIONS + fuzz_captions(300, seed=1):
        assert ptb.ptb_lex(line, fast=True) == ptb.ptb_lex(line, fast=False), line
