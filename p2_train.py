"""Trains the P2 captioner: frozen ViT -> frozen GPT-2 with trained cross-attention and PEFT, one loop; or, with
--arch gru|attention-gru|transformer, a classic decoder trained from scratch over the same frozen encoder's tokens.

The entry point; the work is in hw3/training/trainer.py (`python3 p2_train.py --help`)."""
from hw3.training.trainer import main
from hw3.util.errors import run_main

if __name__ == "__main__":
    run_main(main)
