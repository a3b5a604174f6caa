"""Training a captioner: the run, the loop, SCST and its CIDEr-D reward."""
