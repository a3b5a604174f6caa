"""metrics: CIDEr equals pycocoevalcap's own pipeline (Java PTBTokenizer + Cider), CLIPScore equals its formula
computed directly on a tiny random CLIP."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from hw3.evaluation import metrics
from hw3.util.errors import UserError

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
    from hw3.models import clip_backend

    path = tmp_path_factory.mktemp("clip") / "tiny-clip-metrics.json"
    path.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    return clip_backend.load_clip(str(path), None, "cpu")


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
    from hw3.data.images import load_rgb

    model, preprocess, tokenizer = tiny_clip
    images = synthetic_images(tmp_path, 7)
    captions = ["a red square", "A photo of a dog.", "", "two cats " * 20, "blue", "green sky", "x"]
    mean, per_image = metrics.clip_score(images, captions, (model, preprocess, tokenizer), batch_size=3)
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

    mean, per_image = metrics.clip_score(synthetic_images(tmp_path, 2), ["a", "b"], (
        Opposite(), lambda im: torch.zeros(3, 4, 4), lambda caps: torch.zeros(len(caps), 5).long()))
    assert per_image == [0.0, 0.0] and mean == 0.0


def test_clip_image_embeddings_are_reused_for_the_same_files_and_redone_for_changed_ones(tiny_clip, tmp_path):
    """A second scoring of the same images with the same CLIP gives the very tensor the first computed, without
    running the image tower; a rewritten file, another batch size or another CLIP computes afresh, equal to a
    fresh computation."""
    model, preprocess, _ = tiny_clip
    paths = synthetic_images(tmp_path, 5)
    towers = []
    real = model.encode_image

    def counted(pixels):
        towers.append(len(pixels))
        return real(pixels)

    model.encode_image = counted
    try:
        first = metrics.clip_image_embeddings(paths, model, preprocess, batch_size=2)
        assert towers == [2, 2, 1]
        again = metrics.clip_image_embeddings(list(paths), model, preprocess, batch_size=2)
        assert towers == [2, 2, 1] and torch.equal(again, first)
        other_batch = metrics.clip_image_embeddings(paths, model, preprocess, batch_size=5)
        assert towers[3:] == [5] and torch.allclose(other_batch, first, atol=1e-5)
        synthetic_images(tmp_path, 5, seed=1)  # the same names, new colours and sizes
        os.utime(paths[0], ns=(1, 1))  # even a file whose size might match differs in its time
        changed = metrics.clip_image_embeddings(paths, model, preprocess, batch_size=2)
        assert towers[4:] == [2, 2, 1] and not torch.allclose(changed, first)
        del model.encode_image
        fresh = metrics._compute_image_embeddings(paths, model, preprocess, 2, "cpu", 0)
        assert torch.equal(changed, fresh)
    finally:
        model.__dict__.pop("encode_image", None)


# ---------------------------------------------------------------------------------------------------------------
# The suite: each metric equals pycocoevalcap's own scorer class on the same tokenised corpus
# ---------------------------------------------------------------------------------------------------------------
def tokenised(preds, refs):
    from hw3.evaluation import ptb

    return (ptb.tokenize({k: list(refs[k]) for k in preds}), ptb.tokenize({k: [preds[k]] for k in preds}))


def test_bleu_rouge_cider_equal_pycocoevalcap_scorers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = corpus(2)
    gts, res = tokenised(preds, refs)
    means, per_image, skipped = metrics.text_scores(preds, refs, ("bleu", "rouge", "cider"))
    assert not skipped and list(means) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        assert means["BLEU-%d" % (n + 1)] == pytest.approx(bleu[n], abs=1e-9)
        assert [per_image[k]["bleu-%d" % (n + 1)] for k in preds] == pytest.approx(bleu_each[n], abs=1e-9)
    for name, scorer in (("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        corpus_score, each = scorer.compute_score(gts, res)
        assert means[name] == pytest.approx(float(corpus_score), abs=1e-9)
        assert [per_image[k][name.lower()] for k in preds] == pytest.approx([float(s) for s in each], abs=1e-9)
    assert 0 < means["BLEU-4"] < means["BLEU-1"] and means["ROUGE-L"] > 0


METEOR_SKIP = metrics.meteor_unavailable()


@pytest.mark.skipif(METEOR_SKIP is not None, reason=METEOR_SKIP or "")
def test_meteor_equals_pycocoevalcap_exactly():
    from pycocoevalcap.meteor.meteor import Meteor

    preds, refs = corpus(3)
    gts, res = tokenised(preds, refs)
    means, per_image, skipped = metrics.text_scores(preds, refs, ("meteor",))
    scorer = Meteor()
    expected, expected_each = scorer.compute_score(gts, res)
    del scorer
    assert not skipped and means["METEOR"] == expected and 0 < expected < 1
    assert [per_image[k]["meteor"] for k in preds] == expected_each


def test_meteor_without_java_is_skipped_in_one_line(monkeypatch, capsys):
    preds, refs = corpus(4)
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    means, per_image, skipped = metrics.text_scores(preds, refs, ("bleu", "meteor", "cider"))
    assert "METEOR" not in means and "BLEU-4" in means and "CIDEr" in means
    line = capsys.readouterr().err.strip()
    assert skipped == {"METEOR": line} and "\n" not in line
    assert "needs Java" in line and "apt-get install default-jre-headless" in line


def test_metric_names():
    assert metrics.parse_metrics("cider,clipscore") == ("cider", "clipscore")
    assert metrics.parse_metrics(" CIDEr , bleu") == ("bleu", "cider")  # print order, whatever the asked order
    assert metrics.parse_metrics("all") == tuple(metrics.METRIC_KEYS)
    assert metrics.result_keys(metrics.parse_metrics("all")) == [
        "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIPScore", "RefCLIPScore"]
    with pytest.raises(UserError, match="--metrics 'cider,spice': choose from bleu, meteor"):
        metrics.parse_metrics("cider,spice")


def test_ref_clip_score_follows_hessel_et_al(tiny_clip, tmp_path):
    """RefCLIP-S = H-Mean(CLIP-S, max(max_r cos(c, r), 0)), each cosine computed here one caption at a time."""
    model, preprocess, tokenizer = tiny_clip
    images = synthetic_images(tmp_path, 4)
    keys = ["a", "b", "c", "d"]
    predictions = dict(zip(keys, ["a red square", "a dog", "", "two cats on a bed"]))
    references = dict(zip(keys, [["a red box", "red square"], ["a dog runs"], ["something"],
                                 ["cats", "two cats", "a bed with two cats on it"]]))
    result = metrics.score_captions(predictions, references,
                                    metrics.Scoring(("clipscore", "refclipscore"), clip=tiny_clip, batch_size=3),
                                    paths=dict(zip(keys, images)))

    def text(caption):
        with torch.no_grad():
            e = model.encode_text(tokenizer([caption]))[0]
        return e / e.norm()

    expected = []
    for k in keys:
        clip_s = result["per_image"][k]["clipscore"]
        best = max(float(text(predictions[k]) @ text(r)) for r in references[k])
        best = max(best, 0.0)
        expected.append(2 * clip_s * best / (clip_s + best) if clip_s + best > 0 else 0.0)
    assert [result["per_image"][k]["refclipscore"] for k in keys] == pytest.approx(expected, abs=1e-5)
    assert result["RefCLIPScore"] == pytest.approx(sum(expected) / 4, abs=1e-6)
    assert metrics.ref_clip_score(0.0, 0.0) == 0.0 and metrics.ref_clip_score(1.0, -0.5) == 0.0
    assert metrics.ref_clip_score(2.5, 1.0) == pytest.approx(2 * 2.5 / 3.5)
