"""Training a captioner, one run of a TrainingConfig:
  config      the run's settings as dataclasses, and to_argv (the one command a record keeps)
  cli         p2_train.py's command line: parser, checks, parse_config
  trainer     train(config): setup, resume or start, the epochs, validate-and-keep; main
  data        the caption splits, the caption length, the loaders
  loop        the cross-entropy epochs: micro-batches, accumulation, the out-of-memory split
  scst        self-critical epochs: rollout, reward, policy step
  validation  validation captions and scores, best.pt kept by --select-on
  state       TrainingState, the torchrun process group, the state file --resume reads, the log
  optimiser   AdamW, warm-up and cosine, the gradient scaler, the course's parameter limit
  cider_reward  CIDEr-D as a per-caption reward
"""
