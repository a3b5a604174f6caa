"""The whole homework in one command, on the course's data layout, resumable stage by stage.

The entry point; the work is in hw3/pipeline/run_all.py (`python3 run_all.py --help`)."""
from hw3.pipeline.run_all import main
from hw3.util.errors import run_main

if __name__ == "__main__":
    run_main(main)
