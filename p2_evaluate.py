"""P2 evaluation with the course's command line: CIDEr-D and CLIPScore of a {file name: caption} prediction file,
and on request the field's other metrics (BLEU-1..4, METEOR, ROUGE-L, RefCLIPScore).

The entry point; the work is in hw3/evaluation/evaluate.py (`python3 p2_evaluate.py --help`)."""
from hw3.evaluation.evaluate import main
from hw3.util.errors import run_main

if __name__ == "__main__":
    run_main(main)
