"""metrics: the Python PTB tokenisation equals pycocoevalcap's Java PTBTokenizer, CIDEr equals pycocoevalcap's own
pipeline, CLIPScore equals its formula computed directly on a tiny random CLIP."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

import metrics
from common import UserError

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
    got = metrics.ptb_tokenize_lines(lines)
    mismatches = [(line, e, g) for line, e, g in zip(lines, expected, got) if e != g]
    assert not mismatches, mismatches[:5]
    for line, e in zip(CAPTIONS, expected):  # the single-caption entry point agrees where context does not matter
        if not line.rstrip().endswith("."):
            assert metrics.ptb_tokenize(line) == e


def test_ptb_tokenize_known_outputs_follow_penn_treebank():
    # Independent of Java: the PTB conventions the CIDEr tokenisation is known for.
    assert metrics.ptb_tokenize("A Dog's toy isn't there.") == "a dog 's toy is n't there"
    assert metrics.ptb_tokenize("(really) \"great\"...") == "-lrb- really -rrb- great"
    assert metrics.ptb_tokenize("cannot") == "can not"


def test_fast_path_equals_full_rule_scan():
    for line in CAPTIONS + fuzz_captions(300, seed=1):
        assert metrics.ptb_lex(line, fast=True) == metrics.ptb_lex(line, fast=False), line


def corpus(seed: int = 0):
    rng = random.Random(seed)
    words = "A a the The man woman dog Dog's cat sits on in with near a table, plate of food. pizza! isn't it's".split()
    refs = {"img%d" % i: [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(5)]
            for i in range(30)}
    preds = {k: (v[0].upper() if i % 3 == 0 else " ".join(rng.choice(words) for _ in range(8)))
             for i, (k, v) in enumerate(refs.items())}
    preds["img1"] = ""  # an empty caption scores 0 without breaking anything
    return preds, refs


def pycocoevalcap_cider(preds, refs):
    """pycocoevalcap's own pipeline, as the course runs it: Java PTBTokenizer on gts and res, then Cider."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in preds})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in preds})
    return Cider().compute_score(gts, res)


@needs_java
@pytest.mark.parametrize("tokenizer", ["python", "java"])
def test_cider_equals_pycocoevalcap_pipeline(tokenizer):
    preds, refs = corpus()
    expected, expected_per_image = pycocoevalcap_cider(preds, refs)
    score, per_image = metrics.cider(preds, refs, tokenizer=tokenizer)
    assert score == pytest.approx(float(expected), abs=1e-12)
    assert list(per_image) == list(preds)
    assert [per_image[k] for k in preds] == pytest.approx([float(s) for s in expected_per_image], abs=1e-12)
    assert score > 0


def test_cider_rewards_the_reference_itself():
    preds, refs = corpus(1)
    perfect = {k: v[0] for k, v in refs.items()}
    assert metrics.cider(perfect, refs)[0] > metrics.cider(preds, refs)[0]


def test_cider_refuses_missing_references():
    preds, refs = corpus()
    del refs["img3"]
    with pytest.raises(UserError, match="img3"):
        metrics.cider(preds, refs)


TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import clip_utils

    path = tmp_path_factory.mktemp("clip") / "tiny-clip-metrics.json"
    path.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    return clip_utils.load_clip(str(path), None, "cpu")


def synthetic_images(n: int, seed: int = 0):
    from PIL import Image

    rng = random.Random(seed)
    return [Image.new("RGB", (rng.randint(20, 60), rng.randint(20, 60)),
                      (rng.randrange(256), rng.randrange(256), rng.randrange(256))) for _ in range(n)]


def test_clip_score_equals_formula(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    images = synthetic_images(7)
    captions = ["a red square", "A photo of a dog.", "", "two cats " * 20, "blue", "green sky", "x"]
    mean, per_image = metrics.clip_score(images, captions, model, preprocess, tokenizer, batch_size=3)
    expected = []
    with torch.no_grad():
        for image, caption in zip(images, captions):  # one at a time, as the course's getCLIPScore
            a = model.encode_image(preprocess(image).unsqueeze(0))[0]
            b = model.encode_text(tokenizer([caption]))[0]
            cos = float(a @ b / (a.norm() * b.norm()))
            expected.append(2.5 * max(cos, 0.0))
    assert per_image == pytest.approx(expected, abs=1e-5)
    assert mean == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert any(s > 0 for s in expected) and all(s >= 0 for s in per_image)


def test_clip_score_clamps_negative_similarity():
    class Opposite(torch.nn.Module):
        """Image and text embeddings point opposite ways: cos = -1, so CLIPScore = 0."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def encode_image(self, x):
            return self.w.expand(x.shape[0], 4)

        def encode_text(self, t):
            return -self.w.expand(t.shape[0], 4)

    mean, per_image = metrics.clip_score(synthetic_images(2), ["a", "b"], Opposite(),
                                         lambda im: torch.zeros(3, 4, 4), lambda caps: torch.zeros(len(caps), 5).long())
    assert per_image == [0.0, 0.0] and mean == 0.0
