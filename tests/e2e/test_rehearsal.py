"""bench.rehearsal's own pieces (the full rehearsal takes minutes and is not a test): the private cache holds each
file where the installed open_clip and timm look for it offline, the data set is one run_all.py accepts, with a GPT-2
the decoder reads, and the checks read run_all.py's records as it writes them."""
from __future__ import annotations

import json

import pytest
import torch

from hw3.models import clip_backend
from hw3.models import encoder
from hw3.zeroshot import classify
from hw3.data import caption_files
from bench import rehearsal
from hw3.models.gpt2 import infer_shape, load_gpt2_weights


@pytest.fixture()
def private_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    return str(tmp_path)


def placed(hub: str, file: rehearsal.WeightFile) -> str:
    path = rehearsal.hub_path(hub, file.repo_id, file.filename, file.revision)
    rehearsal.save_tensors({"x": torch.zeros(1)}, path)
    return path


def test_the_default_models_are_found_where_the_cache_writer_puts_them(private_hub):
    model, tag = clip_backend.P1_MODELS["open_clip"]
    assert clip_backend.cached_clip(model, tag) is None
    clip_file = rehearsal.open_clip_file("P1", model, tag)
    path = placed(private_hub, clip_file)
    assert clip_backend.cached_clip(model, tag) == path

    name = encoder.EncoderSpec.parse(encoder.DEFAULT_ENCODER).name
    assert encoder.timm_weights_cached(name) is None
    encoder_file = rehearsal.timm_file("P2 encoder", name)
    path = placed(private_hub, encoder_file)
    assert encoder.timm_weights_cached(name) == path
    # timm 0.9.10 reads the whole open_clip CLIP from Apple's repository; timm 1.x its own image tower
    assert encoder_file.library.startswith("open_clip " if "open_clip" in encoder_file.filename else "timm ")


def test_the_data_set_has_the_course_layout_and_a_course_format_gpt2(tmp_path):
    rehearsal.write_data(str(tmp_path), gpt2_layers=1)
    classes = classify.read_id2label(str(tmp_path / "p1_data" / "id2label.json"))
    names = sorted(p.name for p in (tmp_path / "p1_data" / "val").iterdir())
    assert sorted(classify.labels_from_names(names, len(classes), "p1")) == list(range(len(classes)))
    for split in ("train", "val"):
        captions = caption_files.load_captions(str(tmp_path / "p2_data" / ("%s.json" % split)),
                                               str(tmp_path / "p2_data" / "images" / split))
        assert len(captions.names) == rehearsal.SIZES[split]
    assert len(list((tmp_path / "p3_data" / "images").iterdir())) == rehearsal.SIZES["p3"]
    shape = infer_shape(load_gpt2_weights(str(tmp_path / "p2_data" / "decoder_model.bin")))
    assert shape == dict(n_layer=1, n_embd=768, vocab_size=50257, block_size=1024)


def test_rerun_check_reads_the_log_after_the_last_plan():
    plan = dict(event="plan", selected=["p1", "report"])
    first = [plan, dict(event="stage done", stage="p1"), dict(event="stage done", stage="report")]
    skipped = [plan, dict(event="say", stage="p1", skipped=True), dict(event="say", stage="report", skipped=True)]
    assert rehearsal.check_rerun(first + skipped)[0]
    assert not rehearsal.check_rerun(first + first)[0]
    assert not rehearsal.check_rerun(first)[0]  # no rerun at all


def test_the_captions_compared_are_those_of_the_shipped_decoding():
    default = dict(method="beam", beam_size=3, length_penalty=1.0)
    results = dict(p2_best="lora", p2_decoding=[default, dict(method="greedy", beam_size=1, length_penalty=1.0)])
    assert rehearsal.run_captions("OUT", dict(results, p2_inference=default)).endswith("p2/lora/pred.json")
    chosen = dict(method="greedy", beam_size=3, length_penalty=1.0)
    assert rehearsal.run_captions("OUT", dict(results, p2_inference=chosen)).endswith("p2/decoding/greedy.json")


def test_absolute_paths_are_found_anywhere_in_a_json():
    config = json.loads('{"inference": {"chosen_on": "CIDEr on /home/me/hw3_data/p2_data/val.json"}, '
                        '"encoder": {"name": "vit", "weights": null}, "files": ["a/b", "/abs"]}')
    assert rehearsal.absolute_paths(config) == ["inference.chosen_on", "files[1]"]
