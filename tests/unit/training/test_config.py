"""to_argv and the trainer's parser agree: a config the pipeline builds, written as the command a record keeps and
parsed back, is the same config; the dataclasses' defaults are the parser's."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from hw3.models.decoding import covering_max_len
from hw3.training import cli
from hw3.training.config import TrainingConfig, to_argv
from hw3.training.data import CAPTION_LENGTH_STEP, caption_length
from hw3.training.state import Dist

DATA = dict(train_json="d/train.json", train_images="d/train", val_json="d/val.json", val_images="d/val")
RUNTIME = dict(workers=2, device="cpu", feature_cache="out/p2/feature_cache")
PIPELINE_CONFIGS = {  # the shapes run_all, compare, distill and scst build
    "p2": dict(DATA, decoder_weights="d/decoder.bin", peft="lora", **RUNTIME, lr=5e-4, epochs=8),
    "compare": dict(DATA, arch="attention-gru", attention_reg=1, **RUNTIME, epochs=15, batch_size=64, lr=5e-4,
                    warmup_steps=500),
    "distill": dict(DATA, arch="gru", val_split="val", **RUNTIME, epochs=0 + 3),
    "scst": dict(DATA, decoder_weights="d/decoder.bin", arch="gpt2", peft="lora", lora_rank=4,
                 lora_targets=["attn.c_attn"], **RUNTIME, epochs=1, scst_epochs=2, scst_samples=4, no_amp=True),
}


@pytest.mark.parametrize("name", sorted(PIPELINE_CONFIGS))
def test_to_argv_parsed_back_is_the_same_config(name):
    config = TrainingConfig.from_options(PIPELINE_CONFIGS[name])
    assert cli.parse_config(to_argv(config)) == config


def test_to_argv_writes_the_options_as_given_in_their_order():
    argv = to_argv(TrainingConfig.from_options(PIPELINE_CONFIGS["compare"]))
    assert argv[:8] == ["--train-json", "d/train.json", "--train-images", "d/train", "--val-json", "d/val.json",
                        "--val-images", "d/val"]
    assert argv[8:12] == ["--arch", "attention-gru", "--attention-reg", "1"]


def test_the_settings_defaults_are_the_parsers():
    parsed = vars(cli.parse_args(["--train-json", "d/train.json", "--train-images", "d/train", "--val-json",
                                      "d/val.json", "--val-images", "d/val"]))
    defaults = vars(cli.command_settings(TrainingConfig.from_options(DATA)))
    assert defaults == parsed


def test_caption_length_resolves_only_the_lengths_not_given_and_not_as_given():
    """The run's caption length comes from the training captions when unset; the command a record keeps does not
    change with it."""
    train = SimpleNamespace(captions=[["a red square on a table"], ["two blue birds"]])
    config = TrainingConfig.from_options(DATA)
    resolved = caption_length(config, train, Dist("cpu"))
    assert resolved.data.max_caption_tokens == CAPTION_LENGTH_STEP
    assert resolved.validation.val_max_len == covering_max_len(CAPTION_LENGTH_STEP)
    assert to_argv(resolved) == to_argv(config)
    given = TrainingConfig.from_options(dict(DATA, max_caption_tokens=20, val_max_len=5))
    assert caption_length(given, train, Dist("cpu")) == given
