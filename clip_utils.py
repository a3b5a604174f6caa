"""The project's one open_clip loader: a model name or a model-config JSON, weights from a tag (local cache only),
a local checkpoint file, or none at all; a missing download fails at once with one line saying what to run."""
from __future__ import annotations

import difflib
import os
from typing import Callable, List, Optional, Tuple

from common import UserError, hub_offline, read_json

DOWNLOAD_HINT = "run `bash hw3_download.sh` (online) or pass --pretrained PATH to a local checkpoint file"
CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _open_clip(offline: bool = True):
    hub_offline(offline)
    import open_clip

    return open_clip


def resolve_model_name(model: str) -> str:
    """An open_clip model name as given, or a model-config JSON registered with open_clip under its file stem."""
    return _resolve_name(_open_clip(), model)


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


def _cached_hub_file(hf_hub: str) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, filename = os.path.split(hf_hub)  # "org/repo/" means open_clip's default file name
    filename = filename or "open_clip_pytorch_model.bin"
    stem = os.path.splitext(filename)[0]
    for name in (stem + ".safetensors", "open_clip_model.safetensors", filename):
        path = try_to_load_from_cache(repo, name)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def cached_weights(pretrained_cfg: dict) -> Optional[str]:
    """The local file open_clip would load for a tag, or None when it still has to be downloaded."""
    if pretrained_cfg.get("file"):
        return pretrained_cfg["file"] if os.path.isfile(pretrained_cfg["file"]) else None
    if pretrained_cfg.get("hf_hub"):
        path = _cached_hub_file(pretrained_cfg["hf_hub"])
        if path:
            return path
    url = pretrained_cfg.get("url")
    if url:
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
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
        open_clip.factory.load_state_dict(pretrained)
    except Exception as load_err:
        return "checkpoint %s is not a readable state-dict file (%s)" % (pretrained, type(load_err).__name__)
    return "checkpoint %s does not fit this model config: %s" % (pretrained, first_line)


def load_clip(model: str, pretrained: Optional[str], device: str = "cpu") -> Tuple[object, Callable, Callable]:
    """(model in eval mode on device, eval preprocess PIL -> tensor, tokenizer List[str] -> ids) from local files only."""
    open_clip = _open_clip()
    name = _resolve_name(open_clip, model)
    kwargs = {}
    if pretrained and not os.path.isfile(pretrained):
        if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise UserError("checkpoint file not found: %s" % pretrained)
        config = _tag_config(open_clip, name, pretrained)
        if cached_weights(config) is None:
            raise UserError("weights %s/%s are not in the local cache (loading never downloads): %s"
                            % (name, pretrained, DOWNLOAD_HINT))
        kwargs["force_quick_gelu"] = bool(config.get("quick_gelu")) or pretrained == "openai"
    try:
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


def list_tags(model: str) -> List[str]:
    open_clip = _open_clip()
    return open_clip.list_pretrained_tags_by_model(_resolve_name(open_clip, model))


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
    open_clip = _open_clip()
    name = _resolve_name(open_clip, args.model)
    path = cached_weights(_tag_config(open_clip, name, args.tag))
    if path is None:
        raise UserError("weights %s/%s are not in the local cache: %s" % (name, args.tag, DOWNLOAD_HINT))
    print(path)
    return 0


if __name__ == "__main__":
    from common import run_main

    run_main(main)
