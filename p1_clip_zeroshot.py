"""P1: zero-shot classification with a pretrained CLIP, no fine-tuning.

The entry point; the work is in hw3/zeroshot/classify.py (`python3 p1_clip_zeroshot.py --help`)."""
from hw3.zeroshot.classify import main
from hw3.util.errors import run_main

if __name__ == "__main__":
    run_main(main)
