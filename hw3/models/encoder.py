"""The frozen image encoder: a timm ViT (its tokens) or CNN (its feature map as grid tokens) named by a small spec, the
checks that its weights can be had, and the view of an image it takes (which original pixels its input pixels come
from).

A spec is written `timm:NAME[.TAG][@WEIGHTS][?key=value&...]` on command lines and saved as JSON in checkpoints:
    NAME.TAG   a timm model and pretrained tag (weights from timm's hub cache, never downloaded at load time)
    @WEIGHTS   a local weight file (timm's layout, or any layout timm's checkpoint filter converts, e.g. open_clip's),
               or `none` for seeded random weights
    ?key=value options for timm.create_model (img_size=96&depth=4 ...)
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from hw3.util import safe_load
from hw3.util.device import hub_offline
from hw3.util.errors import UserError
from hw3 import REPO_ROOT

# CLIP ViT-H/14 trained on DFN-5B: the strongest CLIP image tower timm 0.9.10 knows below ViT-bigG (83.4% ImageNet
# zero-shot vs 78.0% for LAION-2B ViT-H/14); 1280 wide, 16x16 patches + CLS at 224 px; a 3.9 GB download.
DEFAULT_ENCODER = "timm:vit_huge_patch14_clip_quickgelu_224.dfn5b"
# torchvision's default ResNet-101 weights (IMAGENET1K_V2, the same file), the classic captioners' CNN; 0.18 GB.
DEFAULT_CNN_ENCODER = "timm:resnet101.tv2_in1k"
DOWNLOAD_HINT = ("run `%s` (online) first, or point the encoder at a local weight file "
                 "(p2_inference.py --encoder timm:NAME@/path/to/weights)")
TIMM_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # what timm's load_state_dict unwraps
RANDOM_INIT_SEED = 0  # `@none` encoders are seeded, so a saved spec rebuilds the same random weights


# ----------------------------------------------------------------------------------------------- the spec

@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    name: str  # timm NAME[.TAG]
    weights: Optional[str] = None  # None = the tag's hub weights, "none" = seeded random, else a local file
    options: Tuple[Tuple[str, object], ...] = ()  # timm.create_model keyword arguments, in the order given

    @classmethod
    def parse(cls, text: str) -> "EncoderSpec":
        """'timm:vit_x@none?img_size=32' -> EncoderSpec('vit_x', 'none', (('img_size', 32),))."""
        backend, sep, rest = text.partition(":")
        if not sep or backend != "timm" or not rest:
            raise UserError("encoder spec %r must look like timm:NAME[.TAG][@WEIGHTS][?key=value&...]" % text)
        rest, _, query = rest.partition("?")
        options = []
        for item in filter(None, query.split("&")):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise UserError("encoder spec %r: option %r is not key=value" % (text, item))
            try:
                options.append((key, json.loads(value)))
            except ValueError:
                options.append((key, value))
        name, at, weights = rest.rpartition("@")
        if not at:
            name, weights = rest, None
        return cls(name, weights or None, tuple(options))

    @classmethod
    def from_json(cls, value) -> "EncoderSpec":
        """A spec as checkpoints save it (a dict), or as older checkpoints did (the string form)."""
        if isinstance(value, str):
            return cls.parse(value)
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise UserError("encoder spec %r is neither a spec string nor {\"name\", \"weights\", \"options\"}"
                            % (value,))
        return cls(value["name"], value.get("weights"), tuple((k, v) for k, v in (value.get("options") or {}).items()))

    def to_json(self) -> dict:
        return dict(name=self.name, weights=self.weights, options=dict(self.options))

    def __str__(self) -> str:
        query = "&".join("%s=%s" % (k, json.dumps(v) if not isinstance(v, str) else v) for k, v in self.options)
        return "timm:%s%s%s" % (self.name, "@" + self.weights if self.weights else "", "?" + query if query else "")

    @property
    def random(self) -> bool:
        return self.weights is not None and self.weights.lower() == "none"

    @property
    def weight_file(self) -> Optional[str]:
        return None if self.weights is None or self.random else self.weights

    def from_repo_root(self) -> "EncoderSpec":
        """A weight file given relative to the repository (as the committed checkpoints do) is found from anywhere."""
        path = self.weight_file
        if path and not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
            return dataclasses.replace(self, weights=os.path.join(REPO_ROOT, path))
        return self


def as_spec(spec) -> EncoderSpec:
    return spec if isinstance(spec, EncoderSpec) else EncoderSpec.parse(spec)


# ----------------------------------------------------------------------------------------------- weight checks

def _timm_pretrained_cfg(name: str) -> Optional[dict]:
    """timm's download recipe for NAME[.TAG] (hub id, file name, url), or None if it has no pretrained weights."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag of a known architecture
        return None
    cfg = cfg.to_dict() if cfg is not None else {}
    return cfg if cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") else None


def _hub_file_order(filename: str):
    """The files timm tries for a hub weight file, in its order: its safetensors alternatives (timm's own
    _get_safe_alternatives, when safetensors is installed), then the file itself."""
    try:
        from timm.models._hub import _get_safe_alternatives, _has_safetensors
    except ImportError:  # a timm without the helper tries only the file
        return [filename]
    return (list(_get_safe_alternatives(filename)) if _has_safetensors else []) + [filename]


def timm_weights_cached(name: str) -> Optional[str]:
    """The local file timm would load for `name` (NAME.TAG), or None when it still has to be downloaded."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _timm_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub_id"):
        repo, _, revision = cfg["hf_hub_id"].partition("@")
        for filename in _hub_file_order(cfg.get("hf_hub_filename") or "pytorch_model.bin"):
            path = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(path, str) and os.path.isfile(path):
                return path
        return None
    if cfg.get("url"):
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg["url"]))
        return path if os.path.isfile(path) else None
    return None


def check_encoder_weights(spec, offline: Optional[bool] = None) -> None:
    """Raises at once, before any model is built, if the encoder's weights cannot be had (unknown name or tag,
    missing local file, not downloaded while offline)."""
    import timm

    spec = as_spec(spec)
    offline = hub_offline() if offline is None else offline
    if spec.weight_file and not os.path.isfile(spec.weight_file):
        raise UserError("encoder weight file not found: %s" % spec.weight_file)
    if not timm.is_model(spec.name.split(".")[0]):
        raise UserError("unknown timm model %r in the encoder spec %s" % (spec.name, spec))
    if spec.weights is not None:
        return
    if _timm_pretrained_cfg(spec.name) is None:
        raise UserError("timm has no pretrained weights for %r (tags: %s)" % (
            spec.name, ", ".join(timm.list_pretrained(spec.name.split(".")[0] + ".*")[:8]) or "none"))
    if offline and timm_weights_cached(spec.name) is None:
        raise UserError("encoder weights %s are not downloaded and this machine is offline: %s"
                        % (spec.name, DOWNLOAD_HINT % download_command(spec)))


def download_command(spec) -> str:
    """What fetches the spec's hub weights: hw3_download.sh alone for the default encoder, --cnn for the default CNN,
    --encoder NAME for any other timm model (a CNN or a ViT)."""
    name = as_spec(spec).name
    if name == EncoderSpec.parse(DEFAULT_ENCODER).name:
        return "bash hw3_download.sh"
    if name == EncoderSpec.parse(DEFAULT_CNN_ENCODER).name:
        return "bash hw3_download.sh --cnn %s" % name
    return "bash hw3_download.sh --encoder %s" % name


# ----------------------------------------------------------------------------------------------- building

def _build(spec: EncoderSpec) -> nn.Module:
    import timm

    kwargs = dict(spec.options, num_classes=0)
    if spec.random:
        with torch.random.fork_rng(devices=[]):  # seeded, leaving the caller's random state alone
            torch.manual_seed(RANDOM_INIT_SEED)
            return timm.create_model(spec.name, pretrained=False, **kwargs)
    try:
        if spec.weight_file:
            return _timm_from_file(spec.name, spec.weight_file, kwargs)
        with safe_load.restricted_torch_load("encoder weights"):  # timm's hub loader calls torch.load itself
            return timm.create_model(spec.name, pretrained=True, **kwargs)
    except UserError:
        raise
    except Exception as err:  # hub, unpickling and shape errors alike: say which encoder and why, on one line
        raise UserError("cannot load encoder %s%s: %s" % (spec.name, " from " + spec.weights if spec.weights else "",
                                                          " ".join(str(err).split())[:300])) from None


def _timm_from_file(name: str, weights: str, kwargs: Dict[str, object]) -> nn.Module:
    """A timm model from a local weight file (timm's own layout, or any layout its checkpoint filter converts, e.g. an
    open_clip CLIP), strict about coverage: timm's pretrained loader turns strictness off when the classifier is
    dropped, so a file missing whole blocks would otherwise load silently with those blocks left random."""
    import timm
    from timm.models import clean_state_dict

    model = timm.create_model(name, pretrained=False, **kwargs)
    state = clean_state_dict(safe_load.load_tensors(weights, "encoder weights", unwrap=TIMM_CHECKPOINT_KEYS))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    head = tuple(n + "." for n in (classifier if isinstance(classifier, (list, tuple)) else [classifier]))
    state = {k: v for k, v in state.items() if not k.startswith(head)}  # num_classes=0: the classifier is not used
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError("encoder weights %s do not fit timm %s%s: missing %s, unexpected %s" % (
            weights, name, " with %s" % kwargs if kwargs else "", missing[:4] + (["..."] if len(missing) > 4 else []),
            unexpected[:4] + (["..."] if len(unexpected) > 4 else [])))
    return model


def _feature_map_shape(model: nn.Module, spec: EncoderSpec, input_size: Tuple[int, ...]) -> Tuple[int, int, int]:
    """(C, h, w) of a CNN's feature map at its input size, from one forward of a blank image: exact whatever the
    padding and strides, where timm's feature_info reduction is only a ratio (176 px give ResNet 6x6, not 5.5x5.5).
    C must be the model's num_features or its last stage's channels (MobileNetV3's and VGG's num_features count a
    head layer outside forward_features); anything else is refused (Swin's (B, h, w, C), a Mixer's (B, N, C))."""
    probe = torch.zeros((1,) + tuple(int(s) for s in input_size))  # (1, 3, H, W)
    try:
        with torch.no_grad():
            features = model.forward_features(probe)
    except Exception as err:  # e.g. a model fixed to another input size
        raise UserError("encoder %s fails on its own input size %s: %s"
                        % (spec, tuple(probe.shape[1:]), " ".join(str(err).split())[:300])) from None
    shape = tuple(getattr(features, "shape", ()))
    stages = getattr(model, "feature_info", None) or [{}]
    if len(shape) != 4 or shape[1] not in (model.num_features, stages[-1].get("num_chs")):
        raise UserError("encoder %s is neither a ViT with patch tokens nor a CNN with a (B, C, h, w) feature map: its "
                        "forward_features gives %s" % (spec, shape or type(features).__name__))
    return int(shape[1]), int(shape[2]), int(shape[3])


class ImageEncoder(nn.Module):
    """A frozen image encoder returning ALL its output tokens (B, N, width). A ViT's are its prefix tokens (CLS,
    registers) then its patch grid; a CNN's are its last feature map, one token per cell, row-major, no prefix.
    The global vector of a grid is the mean of its tokens (a CNN's own pooling); the decoders take it themselves."""

    def __init__(self, spec=DEFAULT_ENCODER, offline: Optional[bool] = None):
        super().__init__()
        from timm.data import create_transform, resolve_data_config

        self.spec = as_spec(spec)
        check_encoder_weights(self.spec, offline)
        self.model = _build(self.spec).eval()  # eval before the probe forward: batch norm keeps its statistics
        self.is_cnn = not (hasattr(self.model, "patch_embed") and hasattr(self.model, "num_prefix_tokens"))
        if self.is_cnn:
            data_config = resolve_data_config({}, model=self.model, use_test_size=True)  # as timm's validate.py
            width, h, w = _feature_map_shape(self.model, self.spec, data_config["input_size"])
            self.width, self.num_prefix_tokens, self.grid_size = width, 0, (h, w)
        else:
            data_config = resolve_data_config({}, model=self.model)
            data_config["input_size"] = (3,) + tuple(int(s) for s in self.model.patch_embed.img_size)
            self.width = int(self.model.num_features)
            self.num_prefix_tokens = int(self.model.num_prefix_tokens)
            self.grid_size = tuple(int(g) for g in self.model.patch_embed.grid_size)
        self.input_size = tuple(int(s) for s in data_config["input_size"][1:])  # (H, W) that `transform` gives
        self.transform = create_transform(**data_config, is_training=False)
        for p in self.parameters():
            p.requires_grad = False
        self.eval()

    def train(self, mode: bool = True) -> "ImageEncoder":
        return super().train(False)  # frozen: dropout/drop-path stay off whatever the caller trains

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised by `transform` -> tokens (B, num_prefix_tokens + h * w, width)."""
        tokens = self.model.forward_features(images)
        if self.is_cnn:
            assert tokens.dim() == 4 and tokens.shape[1] == self.width, tuple(tokens.shape)
            tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # (B, C, h, w) -> (B, h * w, C)
        assert tokens.dim() == 3 and tokens.shape[-1] == self.width, tuple(tokens.shape)
        return tokens


def download_encoder(spec=DEFAULT_ENCODER) -> None:
    """Online: builds the encoder once so that its weights land in the hub cache that offline inference reads."""
    ImageEncoder(spec, offline=False)


# ----------------------------------------------------------------------------------------------- what it sees

def display_image(image, transform):
    """The image as the encoder saw it: the PIL-to-PIL steps of its transform (resize, crop), not the tensor ones."""
    for step in getattr(transform, "transforms", []):
        if "ToTensor" in type(step).__name__ or "Normalize" in type(step).__name__:
            break
        image = step(image)
    return image


def coordinate_mapper(image_size: Tuple[int, int], transform) -> Tuple[Tuple[int, int], Callable]:
    """(size of the shown image, f) where f maps a pixel of the shown (resized, cropped) image back to the original
    image, whatever the transform's geometry (a ViT's or a CNN's: only the transform counts): the same steps are applied
    to ramps that encode x and y in two channels, and read back."""
    import numpy as np
    from PIL import Image

    width, height = image_size
    xs = np.broadcast_to(np.linspace(0, 255, width)[None, :], (height, width))
    ys = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    ramps = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).round().astype(np.uint8)
    shown = display_image(Image.fromarray(ramps), transform)

    def to_original(x: float, y: float) -> Tuple[float, float]:
        px = min(max(int(x), 0), shown.size[0] - 1)
        py = min(max(int(y), 0), shown.size[1] - 1)
        r, g = shown.getpixel((px, py))[:2]
        return r / 255.0 * (width - 1), g / 255.0 * (height - 1)

    return shown.size, to_original


__all__ = ["DEFAULT_CNN_ENCODER", "DEFAULT_ENCODER", "EncoderSpec", "ImageEncoder", "as_spec", "check_encoder_weights",
           "coordinate_mapper", "display_image", "download_command", "download_encoder", "timm_weights_cached"]
