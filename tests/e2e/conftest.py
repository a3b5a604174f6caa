"""The end-to-end tests' shared runs: the full demo runs once per test process, and every test that reads its
outputs takes them from here instead of running a demo of its own."""
from __future__ import annotations

import os

import pytest

DEMO_GROUP = pytest.mark.xdist_group("demo")  # under xdist a session fixture is per worker: its readers stay on one


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`bash demo.sh` on the full world into a private folder: (that folder, its results.json). Readers must not
    write into the folder."""
    from hw3.util.files import read_json
    from miniworld import demo

    out = str(tmp_path_factory.mktemp("full_demo"))
    assert demo.main(["--out", out]) == 0
    return out, read_json(os.path.join(out, "results.json"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The small world in the course's layout (the demo's data at --small), one per module that asks for it."""
    from miniworld import demo, generate

    folder = str(tmp_path_factory.mktemp("world") / "data")
    generate.generate(folder, 0, True, "course", os.path.join(demo.MODELS, "decoder_model.bin"))
    return folder


@pytest.fixture(scope="module")
def short_grid():
    """run_all's decoding grid cut to the README default and greedy: the decoding table's logic at a third of its
    time (in-process runs only; a subprocess decodes the whole grid)."""
    from hw3.pipeline import context

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(context, "DECODING_GRID", context.DECODING_GRID[:2])
        yield
