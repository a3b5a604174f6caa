"""cider_reward: per-caption CIDEr-D with a fixed corpus's document frequencies equals pycocoevalcap's Cider over
the same references, caption by caption; it rewards what matches the image's references."""
from __future__ import annotations

import random

import pytest
from pycocoevalcap.cider.cider_scorer import CiderScorer

from hw3.training.cider_reward import END_WORD, CiderD, words

VOCAB = "a an the red blue green small large square circle triangle star on left right of and two three".split()


def corpus(seed: int, images: int = 30):
    rng = random.Random(seed)
    sentence = lambda: " ".join(rng.choice(VOCAB) for _ in range(rng.randint(3, 12)))  # noqa: E731
    refs = {"img%d" % i: [sentence() for _ in range(rng.randint(1, 5))] for i in range(images)}
    hyps = {k: rng.choice([sentence(), v[0], v[0] + " " + sentence(), ""]) for k, v in refs.items()}
    return refs, hyps


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("end_word", [False, True])
def test_equals_pycocoevalcap_over_the_same_references(seed, end_word):
    """Caption by caption, as pycocoevalcap scores the same words (with the end word written out when it counts)."""
    refs, hyps = corpus(seed)
    end = " " + END_WORD if end_word else ""
    ended = {k: i % 3 != 0 for i, k in enumerate(refs)}  # a third were cut by the length limit
    scorer = CiderScorer(n=4, sigma=6.0)
    for key in refs:
        scorer += (hyps[key] + (end if ended[key] else ""), [r + end for r in refs[key]])
    _, expected = scorer.compute_score()
    ours = CiderD(refs, end_word=end_word).scores(list(refs), [hyps[k] for k in refs], [ended[k] for k in refs])
    assert ours == pytest.approx(list(expected), rel=1e-9, abs=1e-12)
    assert max(ours) > 1.0  # some hypotheses copy a reference


def test_a_fixed_corpus_and_light_tokenisation():
    refs = {"a": ["A red square, on the left.", "a red square"], "b": ["two blue circles"], "c": ["a green star"]}
    cider = CiderD(refs)
    right, wrong = cider.scores(["a", "a"], ["a red square on the left", "a blue circle"])
    assert right > 2 * wrong and wrong >= 0
    assert cider.score("a", "A RED square!") == pytest.approx(cider.score("a", "a red square"))
    assert words("It's a Red-square.") == "it's a red square"
    assert cider.scores(["b", "b"], ["two blue circles"] * 2)[0] == cider.score("b", "two blue circles")
    with pytest.raises(KeyError):
        cider.score("unknown image", "a red square")


def test_the_end_word_rewards_finishing_the_sentence():
    refs = {"a": ["a red square on a table", "a red square on a gray table"], "b": ["two blue circles"],
            "c": ["a green star in a box"]}  # idf needs other images
    with_end, without = CiderD(refs, end_word=True), CiderD(refs)
    full, cut = "a red square on a table", "a red square on a"
    assert with_end.score("a", full) > with_end.score("a", cut)
    assert with_end.score("a", full) - with_end.score("a", cut) > without.score("a", full) - without.score("a", cut)
    assert with_end.score("a", full, ended=False) < with_end.score("a", full)  # cut at the length limit
