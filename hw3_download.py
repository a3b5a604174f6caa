"""Downloads, once, everything hw3_1.sh and hw3_2.sh need that is not in the repository.

The entry point; the work is in hw3/models/downloads.py (`python3 hw3_download.py --help`)."""
from hw3.models.downloads import main
from hw3.util.errors import run_main

if __name__ == "__main__":
    run_main(main)
