"""P2 inference: captions every image of a folder into {file name without extension: caption} (the course's JSON).

The entry point; the work is in hw3/inference/predict.py (`python3 p2_inference.py --help`)."""
from hw3.inference.predict import main
from hw3.util.errors import run_main

if __name__ == "__main__":
    run_main(main)
