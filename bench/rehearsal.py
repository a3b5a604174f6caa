"""The student's GPU day rehearsed on CPU at real size: run_all.py at its real defaults on a tiny course-layout data
set, with random weights of the real models saved where a download puts them.

    python3 -m bench.rehearsal --out DIR           # 20-25 minutes on 2 busy cores, 7-9 GB of disk, 8.3 GB of RAM
    python3 -m bench.rehearsal --out DIR --small   # development aid: small real architectures

In DIR: cache/ (a private hub cache: HF_HOME, HF_HUB_CACHE, TORCH_HOME and XDG_CACHE_HOME point inside it, the hub
offline), data/ (the course's hw3_data layout, a handful of images), out/ (run_all.py's OUT), ship/ (a copy of the
repository's top-level files with out/p2/p2_best in its checkpoints/, as a grader's clone holds it), logs/.
Steps, each a child process whose wall time and peak RSS are measured:
  prepare   random weights of P1's CLIP, the CLIPScore CLIP and P2's encoder under the hub names and file names the
            installed open_clip and timm look for (asked of them, then checked with the project's own cache look-ups),
            a random GPT-2 in the course's decoder_model.bin format, the data set
  run       run_all.py --device cpu --workers 0 with one short training per attempt (--train-config)
  rerun     the same command again: every stage must be skipped
  hw3_2     bash ship/hw3_2.sh on the val images: the captions must equal the run's own val captions of the best
            attempt under the shipped decoding (empty captions included)
It prints stage times (run_all.py's stage markers and "timings"), peak RSS, disk used, and what it noticed (warnings,
empty captions, absolute paths in p2_best.json); DIR/rehearsal.json keeps the figures. A failed check or step ends it
with one line (`error: ...`, exit status 2). Not a test (too slow for CI): run it before a release and after changes
to loading, training or the pipeline.
Reusing DIR reuses the weights and the data; out/ and ship/ start afresh.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

from hw3.util.errors import UserError, run_main
from hw3.util.files import read_json, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0
# Each attempt trains one short epoch; everything else is run_all.py's and p2_train.py's default.
TRAIN_OPTIONS = dict(epochs=1, batch_size=8, warmup_steps=1, log_every=1)
SIZES = dict(p1_classes=10, train=8, val=4, p3=2, captions=5)  # a handful of images
# --small: a development aid, small real architectures through the same code (hub names, file formats, stages).
SMALL_CLIP = ("ViT-B-32", "openai")  # the CLIPScore CLIP, also as P1's
SMALL_ENCODER = "timm:vit_base_patch32_clip_224.openai"
SMALL_GPT2_LAYERS = 2
HUB_FILE = "pytorch_model.bin"  # timm's (and the hub's) default file name when a config names none
COMMIT = "0" * 40  # the snapshot every file of the private cache sits in (refs/main points at it)
STAGE_ORDER = ("p1", "p2", "p3", "report")  # run_all.py's STAGES
SHIPPED_FILES = (".py", ".sh", ".json", ".bpe")  # the repository's top-level files hw3_2.sh may need
SHIPPED_PACKAGE = "hw3"  # and the package they call
WARNING = re.compile(r"\b\w*(Warning|warning|WARNING)\b:?(.*)")
CLASS_NAMES = ("apple", "bicycle", "castle", "dolphin", "forest", "guitar", "lighthouse", "mountain", "rocket",
               "tulip", "whale", "zebra")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("square", "circle", "triangle")


class Paths:
    """DIR's parts: cache/ (weights), data/ (hw3_data), out/ (run_all.py's OUT), ship/ (a grader's clone), logs/."""

    def __init__(self, root: str):
        self.root = root
        for name in ("cache", "data", "out", "ship", "logs"):
            setattr(self, name, os.path.join(root, name))


# ----------------------------------------------------------------------------------------------- private cache

def cache_env(paths: Paths) -> Dict[str, str]:
    """The child processes' environment: every model cache inside DIR, the hub offline, and this environment's
    python3 first on PATH (hw3_2.sh runs `python3`)."""
    hf_home = os.path.join(paths.cache, "huggingface")
    bin_dir = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(bin_dir, "python3")):
        raise UserError("%s has no python3 beside it, which hw3_2.sh would run: use a virtual environment's python"
                        % sys.executable)
    return dict(os.environ, HF_HOME=hf_home, HF_HUB_CACHE=os.path.join(hf_home, "hub"),
                HUGGINGFACE_HUB_CACHE=os.path.join(hf_home, "hub"), TORCH_HOME=os.path.join(paths.cache, "torch"),
                XDG_CACHE_HOME=paths.cache, HF_HUB_OFFLINE="1", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                PYTHONUNBUFFERED="1")


def hub_path(hub_cache: str, repo_id: str, filename: str, revision: Optional[str] = None) -> str:
    """Where a hub download of repo_id/filename lands: models--ORG--NAME/snapshots/<commit>/FILE, with the
    revision's ref (refs/main by default) naming the commit."""
    folder = os.path.join(hub_cache, "models--" + repo_id.replace("/", "--"))
    commit = revision if revision and re.fullmatch(r"[0-9a-f]{40}", revision) else COMMIT
    if commit == COMMIT:
        ref = os.path.join(folder, "refs", revision or "main")
        os.makedirs(os.path.dirname(ref), exist_ok=True)
        with open(ref, "w") as f:
            f.write(COMMIT)
    return os.path.join(folder, "snapshots", commit, filename)


class WeightFile(NamedTuple):
    what: str
    repo_id: str
    filename: str
    revision: Optional[str]
    library: str  # whose state-dict layout the file holds: "open_clip MODEL" or "timm NAME"


def open_clip_file(what: str, model: str, tag: str) -> WeightFile:
    """The hub file the installed open_clip reads for a tag: the file its config names, or the first it tries."""
    import open_clip
    from open_clip import pretrained

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg.get("hf_hub"):
        raise UserError("open_clip %s/%s has no hub file (only %s): the rehearsal writes hub files only"
                        % (model, tag, cfg.get("url") or "nothing"))
    repo_id, filename = os.path.split(cfg["hf_hub"])
    if not filename:
        tried = list(pretrained._get_safe_alternatives(pretrained.HF_WEIGHTS_NAME)) \
            if getattr(pretrained, "_has_safetensors", False) else []
        filename = (tried + [pretrained.HF_WEIGHTS_NAME])[0]
    return WeightFile(what, repo_id, filename, None, "open_clip " + model)


def timm_file(what: str, name: str) -> WeightFile:
    """The hub file the installed timm reads for NAME.TAG (encoder.py's rules): the file its config names, or the
    first it tries; an open_clip file (timm 0.9.10's DFN-5B) holds the whole CLIP of the open_clip tag on that repo."""
    from hw3.models import encoder
    from open_clip import pretrained

    cfg = encoder._timm_pretrained_cfg(name)
    if not cfg or not cfg.get("hf_hub_id"):
        raise UserError("timm %s has no hub weights: the rehearsal writes hub files only" % name)
    repo_id, _, revision = cfg["hf_hub_id"].partition("@")
    filename = cfg.get("hf_hub_filename") or encoder._hub_file_order(HUB_FILE)[0]
    library = "timm " + name
    if filename in (pretrained.HF_WEIGHTS_NAME, pretrained.HF_SAFE_WEIGHTS_NAME):
        library = "open_clip " + open_clip_model_on(repo_id)
    return WeightFile(what, repo_id, filename, revision or None, library)


def open_clip_model_on(repo_id: str) -> str:
    import open_clip

    for model, tag in open_clip.list_pretrained():
        if (open_clip.get_pretrained_cfg(model, tag).get("hf_hub") or "").rstrip("/") == repo_id:
            return model
    raise UserError("no open_clip tag downloads from %s, so the layout of its open_clip file is unknown" % repo_id)


def weight_files(small: bool) -> List[WeightFile]:
    from hw3.models import clip_backend
    from hw3.models import encoder

    if clip_backend.resolve_backend("auto") != "open_clip":
        raise UserError("the rehearsal needs open_clip (P1's default backend); OpenAI's clip files are not written")
    p1 = SMALL_CLIP if small else clip_backend.P1_MODELS["open_clip"]
    files = [open_clip_file("P1 CLIP %s/%s" % p1, *p1)]
    if tuple(p1) != tuple(clip_backend.CLIPSCORE_CLIP):
        files.append(open_clip_file("CLIPScore CLIP %s/%s" % clip_backend.CLIPSCORE_CLIP, *clip_backend.CLIPSCORE_CLIP))
    spec = encoder.EncoderSpec.parse(SMALL_ENCODER if small else encoder.DEFAULT_ENCODER)
    return files + [timm_file("P2 encoder " + spec.name, spec.name)]


def random_state(library: str) -> Dict[str, object]:
    import open_clip
    import timm
    import torch

    kind, name = library.split(" ", 1)
    torch.manual_seed(SEED)
    model = open_clip.create_model(name, pretrained=None) if kind == "open_clip" else \
        timm.create_model(name, pretrained=False)
    return model.state_dict()


def save_tensors(state: Dict[str, object], path: str) -> None:
    """torch.save or safetensors by the file's name, written whole or not at all; tensors only, all finite (the
    project's safe loader refuses anything else)."""
    import torch

    bad = [k for k, v in state.items() if not torch.is_tensor(v) or (v.is_floating_point() and
                                                                    not bool(torch.isfinite(v).all()))]
    if bad:
        raise UserError("random weights for %s hold non-finite or non-tensor values: %s" % (path, bad[:3]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path + ".part"
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, part, metadata={"format": "pt"})
    else:
        torch.save(state, part)
    os.replace(part, path)


def check_found(files: List[WeightFile], small: bool) -> None:
    """The project's own cache look-ups (what hw3_download.sh and the scripts check) must land on the files."""
    from hw3.models import clip_backend
    from hw3.models import encoder

    hub_cache = os.environ["HF_HUB_CACHE"]
    p1 = SMALL_CLIP if small else clip_backend.P1_MODELS["open_clip"]
    spec = encoder.EncoderSpec.parse(SMALL_ENCODER if small else encoder.DEFAULT_ENCODER)
    found = [clip_backend.cached_clip(*p1), clip_backend.cached_clip(*clip_backend.CLIPSCORE_CLIP),
             encoder.timm_weights_cached(spec.name)]
    written = {hub_path(hub_cache, f.repo_id, f.filename, f.revision) for f in files}
    for path in found:
        if path is None or os.path.realpath(path) not in {os.path.realpath(w) for w in written}:
            raise UserError("the private cache is not where the installed libraries look: found %s, wrote %s"
                            % (path, ", ".join(sorted(written))))


def write_gpt2(path: str, n_layer: int) -> None:
    """A random GPT-2 (GPT-2 small's widths) in the course's decoder_model.bin format: the trunk's tensors in Conv1D
    layout (in, out), with the causal-mask buffers the course file carries; GPT-2's initialisation."""
    import math

    import torch
    from hw3.models.gpt2 import GPT2_SMALL

    n_embd, block = GPT2_SMALL["n_embd"], GPT2_SMALL["block_size"]
    g = torch.Generator().manual_seed(SEED)

    def normal(*shape: int, std: float = 0.02):
        return torch.randn(*shape, generator=g) * std

    state = {"wte.weight": normal(GPT2_SMALL["vocab_size"], n_embd), "wpe.weight": normal(block, n_embd, std=0.01)}
    mask = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
    for i in range(n_layer):
        h, residual_std = "h.%d." % i, 0.02 / math.sqrt(2 * n_layer)
        for ln in ("ln_1", "ln_2"):
            state[h + ln + ".weight"], state[h + ln + ".bias"] = torch.ones(n_embd), torch.zeros(n_embd)
        for name, n_in, n_out, std in (("attn.c_attn", n_embd, 3 * n_embd, 0.02),
                                       ("attn.c_proj", n_embd, n_embd, residual_std),
                                       ("mlp.c_fc", n_embd, 4 * n_embd, 0.02),
                                       ("mlp.c_proj", 4 * n_embd, n_embd, residual_std)):
            state[h + name + ".weight"], state[h + name + ".bias"] = normal(n_in, n_out, std=std), torch.zeros(n_out)
        state[h + "attn.bias"] = mask
    state["ln_f.weight"], state["ln_f.bias"] = torch.ones(n_embd), torch.zeros(n_embd)
    save_tensors(state, path)


# ----------------------------------------------------------------------------------------------- data

def write_data(folder: str, gpt2_layers: int) -> None:
    """The course's hw3_data layout with a handful of synthetic images: coloured shapes, captions that name them."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(SEED)

    def scene(path: str, size: Tuple[int, int]) -> str:
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        w, h = size
        box = [rng.randrange(w // 2), rng.randrange(h // 2), w // 2 + rng.randrange(w // 2), h // 2 + rng.randrange(h // 2)]
        {"square": draw.rectangle, "circle": draw.ellipse}.get(shape, lambda b, fill: draw.polygon(
            [(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill))(box, fill=colour)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path)
        return "a %s %s on a plain background" % (colour, shape)

    names = CLASS_NAMES[:SIZES["p1_classes"]]
    for label in range(len(names)):
        scene(os.path.join(folder, "p1_data", "val", "%d_%d.png" % (label, 1000 + label)), (224, 224))
    write_json(os.path.join(folder, "p1_data", "id2label.json"), {str(i): n for i, n in enumerate(names)})
    for split, offset in (("train", 0), ("val", 900000)):
        images, annotations = [], []
        for index in range(SIZES[split]):
            image_id = offset + index + 1
            file_name = "%012d.jpg" % image_id
            caption = scene(os.path.join(folder, "p2_data", "images", split, file_name), (320, 240))
            images.append(dict(file_name=file_name, id=image_id))
            for k in range(SIZES["captions"]):
                words = caption.split()
                annotations.append(dict(caption=" ".join(words[:3] if k % 2 else words), image_id=image_id,
                                        id=len(annotations) + 1 + offset))
        write_json(os.path.join(folder, "p2_data", "%s.json" % split), dict(images=images, annotations=annotations))
    for index in range(SIZES["p3"]):
        scene(os.path.join(folder, "p3_data", "images", "p3_%d.jpg" % index), (320, 240))
    write_gpt2(os.path.join(folder, "p2_data", "decoder_model.bin"), gpt2_layers)


def prepare(paths: Paths, small: bool) -> None:
    """Runs in the child whose environment is cache_env(paths): the weights (reused when present) and the data."""
    import torch

    from hw3.models import encoder
    from hw3.models.gpt2 import GPT2_SMALL

    files = weight_files(small)
    record = []
    for f in files:
        path = hub_path(os.environ["HF_HUB_CACHE"], f.repo_id, f.filename, f.revision)
        if not os.path.isfile(path):
            print("== prepare: random %s (%s layout) -> %s" % (f.what, f.library, os.path.relpath(path, paths.root)),
                  file=sys.stderr, flush=True)
            save_tensors(random_state(f.library), path)
        record.append(dict(f._asdict(), path=path, bytes=os.path.getsize(path)))
    check_found(files, small)
    layers = SMALL_GPT2_LAYERS if small else GPT2_SMALL["n_layer"]
    marker = os.path.join(paths.data, "rehearsal_data.json")
    if not os.path.isfile(marker) or read_json(marker) != dict(sizes=SIZES, gpt2_layers=layers, seed=SEED):
        print("== prepare: data set (course layout, GPT-2 with %d layers) -> %s" % (layers, paths.data),
              file=sys.stderr, flush=True)
        shutil.rmtree(paths.data, ignore_errors=True)
        write_data(paths.data, layers)
        write_json(marker, dict(sizes=SIZES, gpt2_layers=layers, seed=SEED))
    import open_clip
    import timm

    versions = dict(python=sys.version.split()[0], torch=torch.__version__, timm=timm.__version__,
                    open_clip=open_clip.__version__)
    write_json(os.path.join(paths.logs, "prepare.json"), dict(weights=record, versions=versions,
                                                              encoder=SMALL_ENCODER if small else encoder.DEFAULT_ENCODER))


# ----------------------------------------------------------------------------------------------- child processes

class Child(NamedTuple):
    seconds: float
    peak_rss: int  # bytes, of the child and its waited-for descendants
    code: int
    stderr: str  # its log file


def run_child(argv: List[str], env: Dict[str, str], logs: str, name: str) -> Child:
    """Runs argv in ROOT, its stderr shown live and kept in logs/NAME.stderr, its stdout in logs/NAME.stdout; the
    wall time and peak RSS (wait4's rusage: this child alone) are measured."""
    os.makedirs(logs, exist_ok=True)
    err_path, out_path = os.path.join(logs, name + ".stderr"), os.path.join(logs, name + ".stdout")
    print("== rehearsal: %s: %s" % (name, " ".join(argv)), file=sys.stderr, flush=True)
    started = time.time()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE)
        for chunk in iter(lambda: os.read(child.stderr.fileno(), 1 << 16), b""):
            err.write(chunk)
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        child.stderr.close()
        _, status, usage = os.wait4(child.pid, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    child.returncode = code
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return Child(round(time.time() - started, 1), peak, code, err_path)


def require(child: Child, what: str) -> None:
    if child.code != 0:
        tail = [line for line in open(child.stderr, encoding="utf-8", errors="replace").read().splitlines()
                if line.strip()][-1:]
        raise UserError("%s failed (exit %d): %s (whole log: %s)" % (what, child.code, tail[0] if tail else "",
                                                                    child.stderr))


# ----------------------------------------------------------------------------------------------- checks

def log_records(path: str) -> List[dict]:
    """run_all.py's JSONL log."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_rerun(records: List[dict]) -> Tuple[bool, str]:
    """Every stage the rerun (from the log's last plan on) planned must be skipped, none run."""
    plans = [i for i, r in enumerate(records) if r.get("event") == "plan"]
    records = records[plans[-1]:] if len(plans) >= 2 else []
    planned = next((r.get("selected") for r in records if r.get("event") == "plan"), None) or []
    skipped = {r.get("stage") for r in records if r.get("skipped")}
    ran = [r.get("stage") for r in records if r.get("event") == "stage done"]
    ok = bool(planned) and not ran and set(planned) <= skipped
    return ok, "rerun: %d of %d stages skipped%s" % (len(skipped & set(planned)), len(planned),
                                                     "; ran again: " + ", ".join(ran) if ran else "")


def decoding_name(settings: dict) -> str:
    """run_all.py's name of a decoding setting (scoring.setting_name): the file its val captions went to."""
    if settings["method"] == "greedy":
        return "greedy"
    return "beam%d_lp%g" % (settings["beam_size"], settings["length_penalty"])


def run_captions(out: str, results: dict) -> str:
    """The run's own val captions of the best attempt under the decoding it shipped."""
    name = decoding_name(results["p2_inference"])
    if any(decoding_name(d) == name for d in results["p2_decoding"][:1]):  # the default: the attempt's own row
        return os.path.join(out, "p2", results["p2_best"], "pred.json")
    return os.path.join(out, "p2", "decoding", name + ".json")


def ship(paths: Paths, results: dict) -> str:
    """A grader's clone: the repository's top-level files and package, with the run's p2_best in its checkpoints/."""
    shutil.rmtree(paths.ship, ignore_errors=True)
    os.makedirs(os.path.join(paths.ship, "checkpoints"))
    for name in sorted(os.listdir(ROOT)):
        if os.path.isfile(os.path.join(ROOT, name)) and name.endswith(SHIPPED_FILES):
            shutil.copy2(os.path.join(ROOT, name), paths.ship)
    shutil.copytree(os.path.join(ROOT, SHIPPED_PACKAGE), os.path.join(paths.ship, SHIPPED_PACKAGE),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shipping = results["p2_shipping"]
    for key, dest in (("checkpoint", "p2_best.pt"), ("config", "p2_best.json")):
        shutil.copy2(shipping[key], os.path.join(paths.ship, "checkpoints", dest))
    return os.path.join(paths.ship, "hw3_2.sh")


def documented_trainable() -> Dict[str, int]:
    """The documented trainable-parameter counts by PEFT method (docs/homework.md's P2 table)."""
    with open(os.path.join(ROOT, "docs", "homework.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| `(\w+)` \|.*\| ([\d,]+) \|$", f.read(), flags=re.M)
    return {method: int(count.replace(",", "")) for method, count in rows}


def absolute_paths(obj, where: str = "") -> List[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in absolute_paths(v, where + "." + str(k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in absolute_paths(v, "%s[%d]" % (where, i))]
    if isinstance(obj, str) and re.search(r"(^|\s)/\w", obj):
        return [where.lstrip(".")]
    return []


def warnings_in(log: str) -> List[Tuple[str, int]]:
    with open(log, encoding="utf-8", errors="replace") as f:
        lines = [" ".join(m.group(0).split())[:160] for m in (WARNING.search(line) for line in f) if m]
    return collections.Counter(lines).most_common()


def disk_usage(folder: str) -> int:
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                total += os.lstat(path).st_blocks * 512
    return total


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="working folder (weights, data, run, logs); about 8.5 GB at real "
                   "size; reusing it reuses the weights and the data")
    p.add_argument("--small", action="store_true", help="development aid: P1 and P2's encoder as %s and %s, a "
                   "2-layer GPT-2 (same code paths, minutes instead of 12)" % ("/".join(SMALL_CLIP), SMALL_ENCODER))
    p.add_argument("--prepare-only", action="store_true", help="only write the weights and the data (in this "
                   "process, whose environment must be the private cache's)")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)
    return args


def gb(n: float) -> str:
    return "%.2f GB" % (n / 1e9)


def rehearse(paths: Paths, small: bool) -> Tuple[Dict[str, Child], dict]:
    """prepare, run, rerun, hw3_2: the children (as measured) and the run's results.json."""
    env = cache_env(paths)
    shutil.rmtree(paths.out, ignore_errors=True)
    shutil.rmtree(paths.logs, ignore_errors=True)
    children = {}
    me = [sys.executable, "-m", "bench.rehearsal", "--out", paths.root] + (["--small"] if small else [])
    children["prepare"] = run_child(me + ["--prepare-only"], env, paths.logs, "prepare")
    require(children["prepare"], "preparing the weights and data")
    train_config = os.path.join(paths.logs, "train_config.json")
    write_json(train_config, {m: TRAIN_OPTIONS for m in ("adapter", "prefix", "lora")})
    command = [sys.executable, "run_all.py", "--data", paths.data, "--out", paths.out, "--train-config", train_config,
               "--workers", "0", "--device", "cpu"]
    if small:
        command += ["--p1-model", SMALL_CLIP[0], "--p1-pretrained", SMALL_CLIP[1], "--encoder", SMALL_ENCODER]
    children["run"] = run_child(command, env, paths.logs, "run")
    require(children["run"], "run_all.py")
    children["rerun"] = run_child(command, env, paths.logs, "rerun")
    require(children["rerun"], "run_all.py (rerun)")
    results = read_json(os.path.join(paths.out, "results.json"))
    children["hw3_2"] = run_child(["bash", ship(paths, results), os.path.join(paths.data, "p2_data", "images", "val"),
                                   os.path.join(paths.ship, "captions.json"),
                                   os.path.join(paths.data, "p2_data", "decoder_model.bin")], env, paths.logs, "hw3_2")
    require(children["hw3_2"], "hw3_2.sh")
    return children, results


def checks(paths: Paths, results: dict, small: bool) -> List[Tuple[bool, str]]:
    done = [check_rerun(log_records(os.path.join(paths.out, "run_all.log")))]
    expected = run_captions(paths.out, results)
    got, want = read_json(os.path.join(paths.ship, "captions.json")), read_json(expected)
    done.append((got == want, "hw3_2.sh captions %s %s (%d images, %d empty)" % (
        "equal" if got == want else "DIFFER from", os.path.relpath(expected, paths.out), len(got),
        sum(1 for c in got.values() if not c.strip()))))
    if not small:  # the documented counts are for ViT-H/14's 1280-wide tokens
        documented = documented_trainable()
        differ = {m: (r["trainable_params"], documented.get(m)) for m, r in results["p2"].items()
                  if documented.get(m) != r["trainable_params"]}
        done.append((not differ, "trainable counts %s" % (
            "equal docs/homework.md's" if not differ
            else "differ from docs/homework.md's (run, documented): %s" % differ)))
    return done


def stage_seconds(out: str) -> Dict[str, float]:
    """Each stage's time as its marker records it (results.json's "timings" lack the report, written after)."""
    folder = os.path.join(out, "stages")
    markers = [read_json(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n.endswith(".json")]
    return {m["stage"]: m["seconds"] for m in sorted(markers, key=lambda m: STAGE_ORDER.index(m["stage"])
                                                        if m["stage"] in STAGE_ORDER else 0)}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    paths = Paths(args.out)
    if args.prepare_only:
        if os.environ.get("HF_HUB_CACHE") != cache_env(paths)["HF_HUB_CACHE"]:  # never random weights in a real cache
            raise UserError("--prepare-only runs in the rehearsal's own child process, whose caches point into %s; "
                            "run without it" % paths.root)
        prepare(paths, args.small)
        return 0
    started = time.time()
    children, results = rehearse(paths, args.small)
    done = checks(paths, results, args.small)
    captions = read_json(os.path.join(paths.ship, "captions.json"))
    figures = dict(
        command=" ".join(["python3", "-m", "bench.rehearsal", "--out", paths.root] + (["--small"] if args.small else [])),
        **read_json(os.path.join(paths.logs, "prepare.json")),
        children={k: dict(seconds=c.seconds, peak_rss_bytes=c.peak_rss, exit=c.code) for k, c in children.items()},
        stages=stage_seconds(paths.out), timings=results.get("timings"), wall_seconds=round(time.time() - started, 1),
        peak_rss_bytes=max(c.peak_rss for c in children.values()),
        disk_bytes={name: disk_usage(getattr(paths, name)) for name in ("cache", "data", "out", "ship")},
        checks=[dict(ok=ok, text=text) for ok, text in done],
        noticed=dict(empty_captions=sum(1 for c in captions.values() if not c.strip()),
                     absolute_paths_in_p2_best_json=absolute_paths(read_json(results["p2_shipping"]["config"])),
                     warnings=warnings_in(children["run"].stderr)[:12]))
    write_json(os.path.join(paths.root, "rehearsal.json"), figures)
    print(summary(figures))
    failed = [text for ok, text in done if not ok]
    if failed:
        raise UserError("rehearsal check failed: " + "; ".join(failed))
    return 0


def summary(figures: dict) -> str:
    v = figures["versions"]
    lines = ["rehearsal: %s" % figures["command"],
             "environment: Python %s, torch %s, timm %s, open_clip %s" % (v["python"], v["torch"], v["timm"],
                                                                         v["open_clip"])]
    for w in figures["weights"]:
        lines.append("  random %s: %s/%s (%s layout, %s)" % (w["what"], w["repo_id"], w["filename"], w["library"],
                                                              gb(w["bytes"])))
    lines += ["", "| step | wall s | peak RSS |", "| --- | --- | --- |"]
    for name, c in figures["children"].items():
        lines.append("| %s | %.0f | %s |" % (name, c["seconds"], gb(c["peak_rss_bytes"])))
    lines += ["| all | %.0f | %s |" % (figures["wall_seconds"], gb(figures["peak_rss_bytes"])), ""]
    lines.append("run_all stages (s): " + ", ".join("%s %.0f" % kv for kv in figures["stages"].items()))
    timings = figures["timings"] or {}
    for key in ("p2_train", "p2_evaluate"):
        if timings.get(key):
            lines.append("  %s (s): %s" % (key, ", ".join("%s %.0f" % kv for kv in timings[key].items())))
    if timings.get("p2_decoding") is not None:
        lines.append("  p2_decoding (s): %.0f" % timings["p2_decoding"])
    disk = figures["disk_bytes"]
    lines.append("disk: %s in all (%s)" % (gb(sum(disk.values())), ", ".join("%s %s" % (k, gb(n))
                                                                           for k, n in disk.items())))
    lines += ["checks:"] + ["  %s %s" % ("ok  " if c["ok"] else "FAIL", c["text"]) for c in figures["checks"]]
    seen = figures["noticed"]
    lines += ["noticed:", "  empty captions from hw3_2.sh: %d" % seen["empty_captions"],
              "  absolute paths in p2_best.json: %s" % (", ".join(seen["absolute_paths_in_p2_best_json"]) or "none")]
    lines += ["  warning x%d: %s" % (n, text) for text, n in seen["warnings"]] or ["  no warnings in run_all's stderr"]
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
