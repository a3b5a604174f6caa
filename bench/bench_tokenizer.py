"""Encoding speed of tokenizer.BPETokenizer on 10,000 captions, against transformers' GPT2Tokenizer in-process.

Run: .venv/bin/python -m bench.bench_tokenizer
"""
from __future__ import annotations

import os
import random
import time


from hw3.data.tokenizer import BPETokenizer

WORDS = ("a man woman dog cat two people riding skateboard surfboard wave kitchen sink food table plate pizza "
         "sitting standing next to on top of the in front with and of small large red blue green white black "
         "bus train street city giraffe elephant zebra field grass tree sky snow skis ski slope tennis racket "
         "court player ball frisbee park bench umbrella rain clock tower building window bed room couch tv").split()


def captions(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "." for _ in range(n)]


def timed(fn, texts):
    start = time.perf_counter()
    out = [fn(t) for t in texts]
    return time.perf_counter() - start, out


def main():
    texts = captions(10_000)
    ours = BPETokenizer()
    cold, ids = timed(ours.encode, texts)
    warm, _ = timed(ours.encode, texts)
    print("BPETokenizer: 10,000 captions in %.3f s (empty word cache), %.3f s (warm cache)" % (cold, warm))
    try:
        import transformers
    except ImportError:
        print("transformers not installed: no reference timing")
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reference = transformers.GPT2Tokenizer(os.path.join(root, "encoder.json"), os.path.join(root, "vocab.bpe"))
    ref_time, ref_ids = timed(reference.encode, texts)
    assert ref_ids == ids, "token ids differ from transformers"
    print("transformers %s %s: %.3f s" % (transformers.__version__, type(reference).__name__, ref_time))
    print("ratio reference / ours (cold cache): %.2fx" % (ref_time / cold))


if __name__ == "__main__":
    main()
