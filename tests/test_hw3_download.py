"""hw3_download.fetch against a local HTTP server with range requests: resume, checksum, idempotence."""
from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest

import hw3_download
from common import UserError

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
    hw3_download.fetch(server, dest, SHA, len(PAYLOAD))
    assert open(dest, "rb").read() == PAYLOAD and not os.path.exists(dest + ".part")
    hw3_download.fetch(server, dest, SHA, len(PAYLOAD))
    assert RangeHandler.requests == [None]  # the second run checked the file and asked nothing


def test_resumes_a_partial_download(server, tmp_path):
    dest = str(tmp_path / "p2_best.pt")
    with open(dest + ".part", "wb") as f:
        f.write(PAYLOAD[:123_456])
    hw3_download.fetch(server, dest, SHA, len(PAYLOAD))
    assert RangeHandler.requests == ["bytes=123456-"]
    assert open(dest, "rb").read() == PAYLOAD


def test_bad_checksum_leaves_nothing(server, tmp_path):
    dest = str(tmp_path / "p2_best.pt")
    with pytest.raises(UserError, match="SHA-256"):
        hw3_download.fetch(server, dest, "0" * 64, len(PAYLOAD))
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")


def test_unreachable_host_fails_at_once(tmp_path):
    with pytest.raises(UserError, match="cannot reach 127.0.0.1.*needs the internet"):
        hw3_download.check_online("127.0.0.1", timeout=2.0)  # nothing listens on loopback port 443
    with pytest.raises(UserError, match="cannot reach"):
        hw3_download.fetch("http://127.0.0.1:9/none", str(tmp_path / "x.pt"), "", 0, timeout=2.0)
