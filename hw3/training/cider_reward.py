"""CIDEr-D as a per-caption reward for self-critical training (--scst-epochs): pycocoevalcap's Cider (Vedantam et
al.'s CIDEr-D: tf-idf n-gram vectors for n = 1..4, clipped, with a Gaussian length penalty, times 10) with the
document frequencies of a fixed corpus, the training references, computed once, and every reference vector
precomputed, as ruotianluo's CiderD does for its "corpus" df. A sample then costs only its own n-grams.

pycocoevalcap recomputes document frequencies from whatever it is given; over the same references the two agree
(tests/unit/training/test_cider_reward.py). Words come from `words`, a light tokenisation (lower case, punctuation
dropped), so the reward never waits for the Java or Python PTB tokeniser.

With `end_word` (p2_train.py --scst-end-word; ruotianluo's CiderD scores its end token so) every reference and every
caption that ended gets the word END_WORD last, so n-grams such as "on a table END" reward finishing a sentence, and a
caption cut off mid-phrase ("a red square on a") loses them: without it, self-critical training learns to stop early.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from pycocoevalcap.cider.cider_scorer import precook

N = 4  # n-grams of 1..4 words
SIGMA = 6.0  # the length penalty's width, pycocoevalcap's
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
END_WORD = "</s>"  # never one of `words`' words

Vector = Tuple[List[Dict[tuple, float]], List[float], int]  # per-order tf-idf weights, their norms, the length


def words(text: str) -> str:
    """A caption as the space-joined words the reward compares (lower case, punctuation dropped)."""
    return " ".join(WORD.findall(text.lower()))


class CiderD:
    """Per-caption CIDEr-D against each image's references, with the document frequencies of `references` (all the
    images the rewards will be asked about, e.g. the training split), computed once."""

    def __init__(self, references: Dict[str, Sequence[str]], end_word: bool = False):
        if not references:
            raise ValueError("CIDEr-D needs the references of at least one image")
        self.end = " " + END_WORD if end_word else ""
        counts = {key: [precook(words(r) + self.end, N) for r in refs] for key, refs in references.items()}
        self.document_frequency: Dict[tuple, float] = defaultdict(float)
        for cooked in counts.values():
            for ngram in {ngram for ref in cooked for ngram in ref}:
                self.document_frequency[ngram] += 1
        self.log_images = math.log(float(len(counts)))  # pycocoevalcap's ref_len
        self.references = {key: [self._vector(ref) for ref in cooked] for key, cooked in counts.items()}

    def _vector(self, counts: Dict[tuple, int]) -> Vector:
        vec: List[Dict[tuple, float]] = [{} for _ in range(N)]
        norm = [0.0] * N
        length = 0
        for ngram, term_freq in counts.items():
            n = len(ngram) - 1
            weight = float(term_freq) * (self.log_images - math.log(max(1.0, self.document_frequency[ngram])))
            vec[n][ngram] = weight
            norm[n] += weight * weight
            if n == 1:  # pycocoevalcap counts the length in bigrams; kept, so that the scores agree
                length += term_freq
        return vec, [math.sqrt(v) for v in norm], length

    def score(self, key: str, caption: str, ended: bool = True) -> float:
        """CIDEr-D of one caption of image `key` (a key of the references given at construction); `ended`: it ended
        with the end token (a caption cut by the length limit did not)."""
        vec, norm, length = self._vector(precook(words(caption) + (self.end if ended else ""), N))
        refs = self.references[key]
        total = 0.0
        for vec_ref, norm_ref, length_ref in refs:
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * SIGMA ** 2))
            for n in range(N):
                ref_n = vec_ref[n]
                value = sum(min(weight, ref_n.get(ngram, 0.0)) * ref_n.get(ngram, 0.0)
                            for ngram, weight in vec[n].items())
                if norm[n] != 0 and norm_ref[n] != 0:
                    value /= norm[n] * norm_ref[n]
                total += value * penalty
        return total / N / len(refs) * 10.0

    def scores(self, keys: Sequence[str], captions: Sequence[str],
               ended: Optional[Sequence[bool]] = None) -> List[float]:
        """Scores of (image key, caption) pairs (all ended unless `ended` says); a caption sampled twice for an image
        is scored once."""
        if len(keys) != len(captions) or (ended is not None and len(ended) != len(keys)):
            raise ValueError("%d keys for %d captions" % (len(keys), len(captions)))
        flags = [True] * len(keys) if ended is None else list(ended)
        seen: Dict[Tuple[str, str, bool], float] = {}
        out = []
        for key, caption, done in zip(keys, captions, flags):
            if (key, caption, done) not in seen:
                seen[key, caption, done] = self.score(key, caption, done)
            out.append(seen[key, caption, done])
        return out


__all__ = ["END_WORD", "CiderD", "words"]
