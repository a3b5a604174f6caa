"""hw3_download: fetch against a local HTTP server with range requests (resume, checksum, idempotence); every part
tried whatever failed first, one summary line per part, and the exit status; a CNN encoder only with --cnn."""
from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import threading

import pytest

from hw3.models import downloads
from hw3.util.errors import UserError

PAYLOAD = os.urandom(300_000)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    requests = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        RangeHandler.requests.append(self.headers.get("Range"))
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests = []
    yield "http://127.0.0.1:%d/p2_best.pt" % httpd.server_address[1]
    httpd.shutdown()


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_then_skip(server, tmp_path):
    dest = str(tmp_path / "checkpoints" / "p2_best.pt")
    downloads.fetch(server, dest, SHA, len(PAYLOAD))
    assert open(dest, "rb").read() == PAYLOAD and not os.path.exists(dest + ".part")
    downloads.fetch(server, dest, SHA, len(PAYLOAD))
    assert RangeHandler.requests == [None]  # the second run checked the file and asked nothing


def test_resumes_a_partial_download(server, tmp_path):
    dest = str(tmp_path / "p2_best.pt")
    with open(dest + ".part", "wb") as f:
        f.write(PAYLOAD[:123_456])
    downloads.fetch(server, dest, SHA, len(PAYLOAD))
    assert RangeHandler.requests == ["bytes=123456-"]
    assert open(dest, "rb").read() == PAYLOAD


def test_bad_checksum_leaves_nothing(server, tmp_path):
    dest = str(tmp_path / "p2_best.pt")
    with pytest.raises(UserError, match="SHA-256"):
        downloads.fetch(server, dest, "0" * 64, len(PAYLOAD))
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")


def test_unreachable_host_fails_at_once(tmp_path):
    with pytest.raises(UserError, match="cannot reach 127.0.0.1.*needs the internet"):
        downloads.check_online("127.0.0.1", timeout=2.0)  # nothing listens on loopback port 443
    with pytest.raises(UserError, match="cannot reach"):
        downloads.fetch("http://127.0.0.1:9/none", str(tmp_path / "x.pt"), "", 0, timeout=2.0)


# ------------------------------------------------------------------ every part is tried; one summary line per part

def no_network_check(monkeypatch, reason=None):
    def check(*args, **kwargs):
        if reason:
            raise UserError(reason)

    monkeypatch.setattr(downloads, "check_online", check)


def part(name, cached=None, fetched=None, error=None, calls=None):
    def fetch():
        calls.append(name)
        if error:
            raise error
        return fetched

    return downloads.Part(name, lambda: cached, fetch)


def summary(capsys):
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "hw3_download summary:"
    return [line.strip() for line in out[1:]]


def test_a_failing_part_does_not_stop_the_others(monkeypatch, capsys):
    calls = []
    parts = [part("P1 CLIP", error=UserError("download of P1 failed"), calls=calls),
             part("P2 encoder", error=RuntimeError("hub\nbroke"), calls=calls),
             part("CLIPScore CLIP", fetched="/cache/b32.bin", calls=calls),
             part("P2 checkpoint", cached="/repo/checkpoints/p2_best.pt", calls=calls)]
    monkeypatch.setattr(downloads, "plan", lambda args: parts)
    no_network_check(monkeypatch)
    assert downloads.main([]) == 1
    assert calls == ["P1 CLIP", "P2 encoder", "CLIPScore CLIP"]  # the cached checkpoint is not fetched again
    assert summary(capsys) == ["P1 CLIP: FAILED: download of P1 failed", "P2 encoder: FAILED: RuntimeError: hub broke",
                               "CLIPScore CLIP: ok (downloaded): /cache/b32.bin",
                               "P2 checkpoint: already there: /repo/checkpoints/p2_best.pt"]


def test_an_unreleased_checkpoint_is_a_warning_with_the_next_step(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(downloads, "REPO_ROOT", str(tmp_path))
    monkeypatch.setitem(downloads.RELEASE, "url", "")
    parts = [part("P1 CLIP", cached="/cache/eva.bin"), downloads.checkpoint_part()]
    monkeypatch.setattr(downloads, "plan", lambda args: parts)
    no_network_check(monkeypatch)
    assert downloads.main([]) == 0
    lines = summary(capsys)
    assert lines[0] == "P1 CLIP: already there: /cache/eva.bin"
    assert lines[1].startswith("P2 checkpoint: WARNING: not released yet: train one with p2_train.py")
    assert "RELEASE" in lines[1] and "checkpoints/p2_best.pt" in lines[1] and "checkpoints/p2_best.json" in lines[1]

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "p2_best.pt").write_bytes(b"tensors")
    (tmp_path / "checkpoints" / "p2_best.json").write_text("{}")
    assert downloads.main([]) == 0
    assert summary(capsys)[1] == "P2 checkpoint: already there: %s" % (tmp_path / "checkpoints" / "p2_best.pt")


def test_offline_reports_every_part_and_keeps_what_is_there(monkeypatch, capsys):
    calls = []
    parts = [part("P1 CLIP", cached="/cache/eva.bin", calls=calls), part("P2 encoder", fetched="/x", calls=calls)]
    monkeypatch.setattr(downloads, "plan", lambda args: parts)
    no_network_check(monkeypatch, "cannot reach huggingface.co (timed out): hw3_download.sh needs the internet")
    assert downloads.main([]) == 1 and calls == []
    assert summary(capsys) == ["P1 CLIP: already there: /cache/eva.bin",
                               "P2 encoder: FAILED: not attempted, cannot reach huggingface.co (timed out): "
                               "hw3_download.sh needs the internet"]
    monkeypatch.setattr(downloads, "plan", lambda args: parts[:1])
    assert downloads.main([]) == 0


def test_a_released_checkpoint_is_fetched_as_a_part(server, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(downloads, "REPO_ROOT", str(tmp_path))
    monkeypatch.setattr(downloads, "RELEASE", dict(url=server, sha256=SHA, bytes=len(PAYLOAD),
                                                      path=os.path.join("checkpoints", "p2_best.pt")))
    monkeypatch.setattr(downloads, "plan", lambda args: [downloads.checkpoint_part()])
    no_network_check(monkeypatch)
    dest = str(tmp_path / "checkpoints" / "p2_best.pt")
    assert downloads.main([]) == 0
    assert summary(capsys) == ["P2 checkpoint: ok (downloaded): %s" % dest]
    assert downloads.main([]) == 0
    assert summary(capsys) == ["P2 checkpoint: already there: %s" % dest] and RangeHandler.requests == [None]


def test_the_plan_names_the_p1_backend_and_honours_the_flags(monkeypatch):
    from hw3.models import clip_backend

    args = argparse.Namespace(skip_p1=False, skip_p2=False, with_clipscore=True, cnn=None)
    names = [p.name for p in downloads.plan(args)]
    assert names[0] == "P1 CLIP EVA02-L-14/merged2b_s4b_b131k (open_clip)" and names[2].startswith("CLIPScore CLIP")
    assert names[1].startswith("P2 encoder timm:") and names[3] == "P2 checkpoint"
    monkeypatch.setattr(clip_backend, "resolve_backend", lambda backend: "openai")
    args.skip_p2, args.with_clipscore = True, False
    assert [p.name for p in downloads.plan(args)] == ["P1 CLIP ViT-L/14@336px (OpenAI's clip)"]

    def neither(backend):
        raise UserError("CLIP needs open_clip_torch or OpenAI's clip (pip name openai-clip) and neither imports")

    monkeypatch.setattr(clip_backend, "resolve_backend", neither)
    only = downloads.plan(args)
    assert [p.name for p in only] == ["P1 CLIP"]
    with pytest.raises(UserError, match="neither imports"):
        only[0].cached()


def test_openai_weights_count_only_with_their_sha256(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    p1_part = downloads.openai_clip_part("P1 CLIP", "ViT-L/14@336px")
    assert p1_part.cached() is None
    (tmp_path / ".cache" / "clip").mkdir(parents=True)
    (tmp_path / ".cache" / "clip" / "ViT-L-14-336px.pt").write_bytes(b"truncated download")
    assert p1_part.cached() is None  # clip's own downloader replaces it when online


def test_a_cnn_encoder_is_fetched_only_when_asked(monkeypatch, capsys):
    """--cnn alone fetches torchvision's ResNet-101 weights through timm (as the encoder loads them), --cnn NAME.TAG
    another; without it nothing is fetched; a spec with weights or options is a wrong command line."""
    from hw3.models import encoder

    fetched, hub = [], {}

    def download(spec):
        fetched.append(spec)
        hub[encoder.EncoderSpec.parse(spec).name] = "/hub/" + spec[len("timm:"):]

    monkeypatch.setattr(encoder, "download_encoder", download)
    monkeypatch.setattr(encoder, "timm_weights_cached", hub.get)
    no_network_check(monkeypatch)
    assert downloads.main(["--skip-p1", "--skip-p2"]) == 0 and summary(capsys) == [] and fetched == []
    assert downloads.main(["--skip-p1", "--skip-p2", "--cnn"]) == 0
    assert summary(capsys) == ["CNN encoder timm:resnet101.tv2_in1k: ok (downloaded): /hub/resnet101.tv2_in1k"]
    assert downloads.main(["--skip-p1", "--skip-p2", "--cnn"]) == 0
    assert summary(capsys) == ["CNN encoder timm:resnet101.tv2_in1k: already there: /hub/resnet101.tv2_in1k"]
    for name in ("resnet18.tv_in1k", "timm:resnet18.tv_in1k"):
        downloads.main(["--skip-p1", "--skip-p2", "--cnn", name])
    assert fetched == ["timm:resnet101.tv2_in1k", "timm:resnet18.tv_in1k"]  # the second time, already there
    capsys.readouterr()

    args = argparse.Namespace(skip_p1=True, skip_p2=False, with_clipscore=False, cnn="timm:resnet18.tv_in1k")
    assert [p.name for p in downloads.plan(args)] == ["P2 encoder %s" % encoder.DEFAULT_ENCODER,
                                                         "CNN encoder timm:resnet18.tv_in1k", "P2 checkpoint"]
    downloads.main(["--skip-p1", "--skip-p2", "--encoder", "vit_small_patch16_224.augreg_in21k"])
    assert summary(capsys) == ["encoder timm:vit_small_patch16_224.augreg_in21k: ok (downloaded): "
                               "/hub/vit_small_patch16_224.augreg_in21k"]  # --encoder: any timm model, a ViT here
    for bad in ("resnet18@none", "resnet18.tv_in1k?output_stride=16", "timm:"):
        with pytest.raises(SystemExit) as exit_info:
            downloads.main(["--skip-p1", "--skip-p2", "--cnn", bad])
        assert exit_info.value.code == 2
    assert "argument --cnn" in capsys.readouterr().err


def test_a_missing_cnn_offline_says_to_run_the_download_with_cnn(monkeypatch, capsys):
    from hw3.models import encoder

    monkeypatch.setattr(encoder, "timm_weights_cached", lambda name: None)
    no_network_check(monkeypatch, "cannot reach huggingface.co (timed out): hw3_download.sh needs the internet")
    assert downloads.main(["--skip-p1", "--skip-p2", "--cnn"]) == 1
    assert summary(capsys) == ["CNN encoder timm:resnet101.tv2_in1k: FAILED: not attempted, cannot reach "
                               "huggingface.co (timed out): hw3_download.sh needs the internet"]
    with pytest.raises(UserError, match=r"run `bash hw3_download\.sh --cnn resnet101\.tv2_in1k` \(online\) first"):
        encoder.check_encoder_weights(encoder.DEFAULT_CNN_ENCODER, offline=True)
