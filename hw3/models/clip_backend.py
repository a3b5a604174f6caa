"""The project's one CLIP loader: a model name or a model-config JSON, weights from a tag (local cache only),
a local checkpoint file, or none at all; a missing download fails at once with one line saying what to run.

Two backends: open_clip (any open_clip model), and OpenAI's `clip` package (its released models), which is what the
course's environment has. OpenAI's files are loaded without running code from them: a TorchScript archive through
torch.jit.load, a state-dict file through `_read_state_dict_file`, then clip.model.build_model."""
from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import os
import warnings
import zipfile
from typing import Callable, Dict, Optional, Tuple

from hw3.util import safe_load
from hw3.util.device import hub_offline
from hw3.util.errors import UserError, run_main
from hw3.util.files import file_sha256, read_json

# P1's default CLIP for each backend. open_clip's published zero-shot CIFAR-100 accuracy (docs/openclip_results.csv):
# EVA02-L-14 merged2b_s4b_b131k 90.71 %, the best of the models whose weights fit an 11 GB card in fp16 and a
# 20-minute download (0.86 GB, fp16); without open_clip, OpenAI's strongest released model, ViT-L/14@336px (74.36 %).
P1_MODELS = {"open_clip": ("EVA02-L-14", "merged2b_s4b_b131k"), "openai": ("ViT-L/14@336px", "openai")}
CLIPSCORE_CLIP = ("ViT-B-32", "openai")  # the course's CLIPScore model
RANDOM_WEIGHTS = ("none", "random")  # a --pretrained that asks for random weights
DOWNLOAD_HINT = "run `bash hw3_download.sh` (online) or pass --pretrained PATH to a local checkpoint file"
CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
BACKEND_MODULES = {"open_clip": "open_clip", "openai": "clip"}
BACKEND_PACKAGES = {"open_clip": "open_clip_torch", "openai": "OpenAI's clip (pip name openai-clip)"}
OPENAI_TAG = "openai"  # the released weights of an OpenAI model name, in OpenAI clip's download folder
OPENAI_CACHE = os.path.join("~", ".cache", "clip")  # where OpenAI's clip (and open_clip, for URLs) downloads to
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _open_clip(offline: Optional[bool] = True):
    """open_clip with the hub set offline (True), online (False) or left as it is (None)."""
    hub_offline(offline)
    import open_clip

    return open_clip


def _import_backend(backend: str):
    """(module, None) or (None, why it does not import); OpenAI's clip warns that pkg_resources is deprecated."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            return importlib.import_module(BACKEND_MODULES[backend]), None
    except ImportError as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        if "pkg_resources" in reason:
            reason += " (OpenAI's clip needs setuptools<81: pip install 'setuptools<81')"
        return None, reason


def resolve_backend(backend: str = "auto") -> str:
    """'open_clip' or 'openai': the one asked for, or for 'auto' open_clip if it imports, else OpenAI's clip."""
    names = ("open_clip", "openai") if backend == "auto" else (backend,)
    reasons = []
    for name in names:
        if name not in BACKEND_MODULES:
            raise UserError("--backend %r is none of auto, %s" % (backend, ", ".join(BACKEND_MODULES)))
        module, reason = _import_backend(name)
        if module is not None:
            return name
        reasons.append("%s: %s" % (BACKEND_PACKAGES[name], reason))
    if backend == "auto":
        raise UserError("CLIP needs open_clip_torch or OpenAI's clip (pip name openai-clip) and neither imports "
                        "(%s)" % "; ".join(reasons))
    raise UserError("--backend %s needs %s, which does not import (%s)"
                    % (backend, BACKEND_PACKAGES[backend], reasons[0]))


def _resolve_name(open_clip, model: str) -> str:
    if model.lower().endswith(".json") or os.path.sep in model:
        config = read_json(model, "CLIP model config")
        missing = [k for k in CONFIG_KEYS if not isinstance(config, dict) or k not in config]
        if missing:
            raise UserError("CLIP model config %s lacks %s (an open_clip config has %s)"
                            % (model, ", ".join(missing), ", ".join(CONFIG_KEYS)))
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    if model.startswith(("hf-hub:", "local-dir:")) or model in open_clip.list_models():
        return model
    close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
    raise UserError("unknown CLIP model %r: not an open_clip model name nor a config JSON file%s"
                    % (model, " (did you mean %s?)" % ", ".join(close) if close else ""))


@contextlib.contextmanager
def _hub_offline_now():
    """The hub offline for the block, whatever it was before: a cache look-up must never download."""
    was = hub_offline()
    hub_offline(True)
    try:
        yield
    finally:
        hub_offline(was)


def cached_weights(pretrained_cfg: dict) -> Optional[str]:
    """The local file the installed open_clip would load for a tag, or None when it still has to be downloaded.
    open_clip itself picks the hub file (its choice between .bin and .safetensors changed across versions), asked
    with the hub offline so that it returns the cached path or fails at once; a URL tag is its download folder."""
    if pretrained_cfg.get("file"):
        return pretrained_cfg["file"] if os.path.isfile(pretrained_cfg["file"]) else None
    open_clip = _open_clip(offline=None)
    has_hub = getattr(open_clip.pretrained, "has_hf_hub", lambda: True)()
    if pretrained_cfg.get("hf_hub") and has_hub:  # open_clip prefers the hub when it has one (download_pretrained)
        with _hub_offline_now():
            try:
                path = open_clip.download_pretrained(pretrained_cfg)
            except Exception:  # offline misses raise FileNotFoundError, or the hub's own error types
                return None
        return path if path and os.path.isfile(path) else None
    url = pretrained_cfg.get("url")
    if url:
        path = os.path.join(os.path.expanduser(OPENAI_CACHE), os.path.basename(url))
        if os.path.isfile(path):
            return path
    return None


def _tag_config(open_clip, name: str, tag: str) -> dict:
    config = open_clip.get_pretrained_cfg(name, tag)
    if not config:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UserError("--pretrained %r is neither a file nor an open_clip tag of %s (its tags: %s)"
                        % (tag, name, ", ".join(tags) if tags else "none"))
    return config


def _explain_load_error(open_clip, pretrained: Optional[str], err: Exception) -> str:
    first_line = " ".join(str(err).split())[:240] or type(err).__name__
    if not (pretrained and os.path.isfile(pretrained)):
        return first_line
    try:
        safe_load.load(pretrained, "CLIP weight file")
    except UserError as load_err:
        return str(load_err)
    return "checkpoint %s does not fit this model config: %s" % (pretrained, first_line)


def load_clip(model: str, pretrained: Optional[str], device: str = "cpu",
              backend: str = "open_clip") -> Tuple[object, Callable, Callable]:
    """(model in eval mode on device, eval preprocess PIL -> tensor, tokenizer List[str] -> ids) from local files only.
    pretrained: a tag, a weight file, or None / 'none' / 'random' for random weights."""
    if pretrained is not None and pretrained.lower() in RANDOM_WEIGHTS:
        pretrained = None
    if backend == "openai":
        return load_openai_clip(model, pretrained, device)
    open_clip = _open_clip()
    name = _resolve_name(open_clip, model)
    kwargs = {}
    if pretrained and not os.path.isfile(pretrained):
        if os.path.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
            raise UserError("checkpoint file not found: %s" % pretrained)
        config = _tag_config(open_clip, name, pretrained)
        if cached_weights(config) is None:
            raise UserError("weights %s/%s are not in the local cache (loading never downloads): %s"
                            % (name, pretrained, DOWNLOAD_HINT))
        kwargs["force_quick_gelu"] = bool(config.get("quick_gelu")) or pretrained == "openai"
    try:
        with safe_load.restricted_torch_load("CLIP weight file"):  # open_clip's torch.load, without code execution
            clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None,
                                                                        device=device, **kwargs)
    except Exception as err:  # open_clip raises RuntimeError/KeyError/pickle errors alike: say which file and why
        raise UserError("cannot load CLIP %s: %s" % (model, _explain_load_error(open_clip, pretrained, err))) from None
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:
        raise UserError("cannot load the tokenizer of CLIP %s (%s): %s"
                        % (model, " ".join(str(err).split())[:200], DOWNLOAD_HINT)) from None
    clip.eval()
    return clip, preprocess, tokenizer


def download_clip(model: str, tag: str) -> str:
    """Online: fetches a tag's weights (and a hub tokenizer if the model has one) into open_clip's normal cache."""
    open_clip = _open_clip(offline=False)
    name = _resolve_name(open_clip, model)
    config = _tag_config(open_clip, name, tag)
    try:
        path = cached_weights(config) or open_clip.download_pretrained(config)
        open_clip.get_tokenizer(name)
    except Exception as err:  # network errors come in many types; the person needs the gist and the source
        source = config.get("hf_hub") or config.get("url")
        raise UserError("download of %s/%s from %s failed (is this machine online?): %s"
                        % (name, tag, source, " ".join(str(err).split())[:200])) from None
    if not path or not os.path.isfile(path):
        raise UserError("download of %s/%s failed (no file returned)" % (name, tag))
    return path


def cached_clip(model: str, tag: str) -> Optional[str]:
    """The local file of an open_clip model's tag, or None when it still has to be downloaded."""
    open_clip = _open_clip(offline=None)
    return cached_weights(_tag_config(open_clip, _resolve_name(open_clip, model), tag))


# ------------------------------------------------------------------------------------- OpenAI's clip package

def _openai_clip():
    module, reason = _import_backend("openai")
    if module is None:
        raise UserError("%s does not import (%s)" % (BACKEND_PACKAGES["openai"], reason))
    import clip.model  # noqa: F401 (build_model)

    return module


def openai_weights_url(model: str) -> str:
    """The URL of an OpenAI model's released weights; its last folder is the file's SHA-256."""
    clip = _openai_clip()
    if model not in clip.available_models():
        close = difflib.get_close_matches(model, clip.available_models(), n=3)
        raise UserError("unknown OpenAI CLIP model %r (OpenAI's models: %s)"
                        % (model, ", ".join(close or clip.available_models())))
    return clip.clip._MODELS[model]


def openai_weights_path(model: str) -> str:
    """Where OpenAI's clip downloads a model's released weights: its folder + the file name of the model's URL."""
    return os.path.join(os.path.expanduser(OPENAI_CACHE), os.path.basename(openai_weights_url(model)))


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files with the model's code in them; torch.save files hold only data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _openai_release_sha256s() -> Dict[str, str]:
    """SHA-256 -> model name of every file OpenAI released (the last folder of each URL in OpenAI clip's list)."""
    clip = _openai_clip()
    return {url.rstrip("/").split("/")[-2]: name for name, url in clip.clip._MODELS.items()}


def read_openai_weights(path: str) -> Dict[str, object]:
    """The state dict of one of OpenAI's released TorchScript archives, or of a plain state-dict file read through
    safe_load (tensors only). TorchScript can run code while it loads (CVE-2025-32434 came through it), so an archive
    is loaded only when its SHA-256 is one OpenAI published; any other archive is refused."""
    import torch

    if not _is_torchscript(path):
        return safe_load.load_tensors(path, "CLIP weight file")
    if file_sha256(path) not in _openai_release_sha256s():
        raise UserError("CLIP weight file %s is a TorchScript archive but not one of OpenAI's released files (their "
                        "SHA-256s are in OpenAI clip's model list); TorchScript can run code, so only those are "
                        "loaded: save the model's state_dict() with torch.save instead" % path)
    try:
        with warnings.catch_warnings():  # torch 2.x deprecates TorchScript; OpenAI's files still are TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as err:  # a damaged archive: say which file
        raise UserError("CLIP weight file %s is not a readable TorchScript archive (%s: %s)"
                        % (path, type(err).__name__, " ".join(str(err).split())[:160])) from None


def _openai_weights_file(model: str, pretrained: Optional[str]) -> str:
    if pretrained is None:
        raise UserError("OpenAI's clip has no random weights: pass --pretrained %s or a weight file "
                        "(random weights need the open_clip backend)" % OPENAI_TAG)
    if os.path.isfile(pretrained):
        return pretrained
    if os.path.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        raise UserError("checkpoint file not found: %s" % pretrained)
    if pretrained != OPENAI_TAG:
        raise UserError("--pretrained %r is neither a file nor %r, the released weights of OpenAI's clip"
                        % (pretrained, OPENAI_TAG))
    path = openai_weights_path(model)
    if not os.path.isfile(path):
        raise UserError("weights of OpenAI CLIP %s are not in the local cache %s (loading never downloads): %s"
                        % (model, path, DOWNLOAD_HINT))
    return path


def load_openai_clip(model: str, pretrained: Optional[str], device: str = "cpu") -> Tuple[object, Callable, Callable]:
    """load_clip through OpenAI's clip: the architecture comes from the weights (clip.model.build_model); fp32, so
    that the caller's autocast decides the GPU precision as with open_clip."""
    clip = _openai_clip()
    path = _openai_weights_file(model, pretrained)
    state_dict = read_openai_weights(path)
    try:
        net = clip.model.build_model(state_dict)
    except Exception as err:  # missing keys or shapes that do not fit: not an OpenAI CLIP state dict
        raise UserError("checkpoint %s is not an OpenAI CLIP state dict (%s: %s)"
                        % (path, type(err).__name__, " ".join(str(err).split())[:160])) from None
    net = net.float().to(device).eval()  # build_model converts the weights to fp16
    preprocess = clip.clip._transform(net.visual.input_resolution)
    tokenizer = functools.partial(clip.tokenize, context_length=net.context_length, truncate=True)
    return net, preprocess, tokenizer


def download_openai_clip(model: str) -> str:
    """Online: OpenAI's clip's own downloader (SHA-256 checked) into its cache; nothing is loaded."""
    clip = _openai_clip()
    path, url = openai_weights_path(model), openai_weights_url(model)
    try:
        return clip.clip._download(url, os.path.dirname(path))
    except Exception as err:  # network errors come in many types
        raise UserError("download of OpenAI CLIP %s from %s failed (is this machine online?): %s"
                        % (model, url, " ".join(str(err).split())[:200])) from None


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="open_clip weights for hw3: fetch them (online) or check the cache.")
    parser.add_argument("action", choices=("download", "check"), help="download: fetch into open_clip's cache; "
                        "check: print the cached file or fail with what to run")
    parser.add_argument("model", help="open_clip model name, e.g. EVA02-L-14 or ViT-B-32")
    parser.add_argument("tag", help="open_clip pretrained tag, e.g. merged2b_s4b_b131k or openai")
    args = parser.parse_args()
    if args.action == "download":
        print(download_clip(args.model, args.tag))
        return 0
    path = cached_clip(args.model, args.tag)
    if path is None:
        raise UserError("weights %s/%s are not in the local cache: %s" % (args.model, args.tag, DOWNLOAD_HINT))
    print(path)
    return 0


if __name__ == "__main__":
    run_main(main)
