"""metrics: CIDEr equals pycocoevalcap's own pipeline (Java PTBTokenizer + Cider), CLIPScore equals its formula
computed directly on a tiny random CLIP."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

import metrics
from common import UserError

HAVE_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason="java not installed: the reference PTBTokenizer needs it")

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


def synthetic_images(folder, n: int, seed: int = 0):
    """n image files of random sizes and colours; returns their paths."""
    from PIL import Image

    rng = random.Random(seed)
    paths = []
    for i in range(n):
        paths.append(str(folder / ("%d.png" % i)))
        Image.new("RGB", (rng.randint(20, 60), rng.randint(20, 60)),
                  (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(paths[-1])
    return paths


def test_clip_score_equals_formula(tiny_clip, tmp_path):
    from common import load_rgb

    model, preprocess, tokenizer = tiny_clip
    images = synthetic_images(tmp_path, 7)
    captions = ["a red square", "A photo of a dog.", "", "two cats " * 20, "blue", "green sky", "x"]
    mean, per_image = metrics.clip_score(images, captions, model, preprocess, tokenizer, batch_size=3)
    expected = []
    with torch.no_grad():
        for image, caption in zip(images, captions):  # one at a time, as the course's getCLIPScore
            a = model.encode_image(preprocess(load_rgb(image)).unsqueeze(0))[0]
            b = model.encode_text(tokenizer([caption]))[0]
            cos = float(a @ b / (a.norm() * b.norm()))
            expected.append(2.5 * max(cos, 0.0))
    assert per_image == pytest.approx(expected, abs=1e-5)
    assert mean == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert any(s > 0 for s in expected) and all(s >= 0 for s in per_image)


def test_clip_score_clamps_negative_similarity(tmp_path):
    class Opposite(torch.nn.Module):
        """Image and text embeddings point opposite ways: cos = -1, so CLIPScore = 0."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def encode_image(self, x):
            return self.w.expand(x.shape[0], 4)

        def encode_text(self, t):
            return -self.w.expand(t.shape[0], 4)

    mean, per_image = metrics.clip_score(synthetic_images(tmp_path, 2), ["a", "b"], Opposite(),
                                         lambda im: torch.zeros(3, 4, 4), lambda caps: torch.zeros(len(caps), 5).long())
    assert per_image == [0.0, 0.0] and mean == 0.0
