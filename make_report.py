"""Builds the homework's report from a results folder (run_all.py's, or the demo's): each report question of the
homework, numbered as the homework numbers it, answered from that folder's own numbers and figures.

The entry point; the work is in hw3/report/compose.py (`python3 make_report.py --help`)."""
from hw3.report.compose import main
from hw3.util.errors import run_main

if __name__ == "__main__":
    run_main(main)
