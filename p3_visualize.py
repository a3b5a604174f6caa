"""P3: the cross-attention of every generated token over the image patches, drawn in the homework's template.

The entry point; the work is in hw3/attention/visualize.py (`python3 p3_visualize.py --help`)."""
from hw3.attention.visualize import main
from hw3.util.errors import run_main

if __name__ == "__main__":
    run_main(main)
