"""Caption files and their splits: the COCO, Karpathy and plain {image: [captions]} formats read into one shape, the
train/val/test splits (a file without splits divided by file-name hash), the captions of a split with their images.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union


from hw3.data.images import list_images
from hw3.util.errors import UserError
from hw3.util.files import read_json



# ----------------------------------------------------------------------------------------------- annotations

def clean_caption(text: str) -> str:
    """One style for every target: lower case, single spaces, no trailing full stop (CIDEr's tokeniser drops case
    and punctuation anyway, so the decoder should not spend capacity on them)."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return re.sub(r"\s*\.+$", "", text)


@dataclass
class CaptionSet:
    """The images of a split (sorted by file name; a name may hold a sub-folder, as Karpathy's `filepath`), each
    one's training captions (cleaned unless asked not to) and its references as written (what metrics score
    against)."""

    folder: str
    annotation_file: str
    names: List[str]
    captions: List[List[str]]
    references: List[List[str]]
    split: str = "all"

    def keys(self) -> List[str]:
        """Prediction keys as the course writes them: the file name without extension."""
        return [image_key(n) for n in self.names]

    def path(self, index: int) -> str:
        return os.path.join(self.folder, self.names[index])

    def subset(self, count: int) -> "CaptionSet":
        return CaptionSet(self.folder, self.annotation_file, self.names[:count], self.captions[:count],
                          self.references[:count], self.split)


def image_key(name: str) -> str:
    """The key of an image in prediction files: its file name without folder or extension (the course's)."""
    return os.path.splitext(os.path.basename(name))[0]


# Caption files come in four formats; each is recognised by its content, never by its name.
FORMATS = {
    "coco": '{"images": [{"file_name", "id"}], "annotations": [{"image_id", "caption"}]} (the course\'s)',
    "karpathy": '{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]} (Flickr8k/30k, COCO '
                'Karpathy splits)',
    "deepfashion": '{file name: one caption paragraph} (DeepFashion-MultiModal captions.json)',
    "plain": '{file name: caption or [captions]}',
}
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # restval trains, as usual
SPLITS = ("train", "val", "test", "all")
VAL_FRACTION = 0.2  # share of a file without splits that --split val takes, by file-name hash


@dataclass
class CaptionFile:
    """A caption file as read: {image name: captions as written} in file order, and each image's split where the
    file carries splits (Karpathy), else None."""

    source: str
    format: str
    captions: "OrderedDict[str, List[str]]"
    splits: Optional[Dict[str, str]] = None


def _unknown(what: str, found: str) -> UserError:
    return UserError("%s: unknown caption format (%s); expected one of: %s" % (
        what, found, "; ".join("%s %s" % (k, v) for k, v in FORMATS.items())))


def read_captions(source: Union[str, dict], kind: str = "caption file") -> CaptionFile:
    """Any of the four caption formats (path or parsed JSON), told apart by content; every problem is one line
    naming the file (as `kind`) and the place in it."""
    what = "%s %s" % (kind, source if isinstance(source, str) else "(in memory)")
    return _without_empty_captions(_read_format(source, kind, what), source if isinstance(source, str) else what)


def _read_format(source: Union[str, dict], kind: str, what: str) -> CaptionFile:
    data = read_json(source, kind) if isinstance(source, str) else source
    if not isinstance(data, dict):
        raise _unknown(what, "the top level is a JSON %s, not an object" % type(data).__name__)
    images = data.get("images")
    if "annotations" in data:
        return CaptionFile(what, "coco", read_coco_captions(data, what))
    if isinstance(images, list) and (not images or isinstance(images[0], dict)):
        return _read_karpathy(images, what)
    if data and all(isinstance(v, str) for v in data.values()):
        for name in data:
            check_image_name(str(name), what, "key %r" % name)
        return CaptionFile(what, "deepfashion", OrderedDict((str(k), [v]) for k, v in data.items()))
    if data and all(isinstance(v, str) or (isinstance(v, list) and all(isinstance(c, str) for c in v))
                    for v in data.values()):
        return CaptionFile(what, "plain", _plain(data, what))
    if not data:
        raise UserError("%s holds no captions (an empty JSON object)" % what)
    key = next(k for k, v in data.items() if not isinstance(v, (str, list)) or
               (isinstance(v, list) and not all(isinstance(c, str) for c in v)))
    raise _unknown(what, "key %r holds a %s" % (key, type(data[key]).__name__))


def check_image_name(name: str, what: str, entry: str) -> None:
    """An image named by a caption file lies inside the image folder: an absolute path, or one that climbs out by
    "..", would read a file the user never pointed at, so it is refused naming the file and the entry."""
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise UserError("%s: %s leaves the image folder (%s); a caption file names its images relative to the "
                        "image folder, without \"..\"" % (what, entry, "an absolute path" if os.path.isabs(name)
                                                           else "by \"..\""))


EMPTY_SAID = set()  # (caption file, count) already said in this process: a file is read by several steps of a run


def _without_empty_captions(caption_file: CaptionFile, file_key: str) -> CaptionFile:
    """Empty captions (nothing but spaces and full stops) left out of every image's references, and counted on
    stderr once per file: an empty reference would mark every caption partly wrong, and teach the decoder to end at
    once."""
    empty = sum(1 for captions in caption_file.captions.values() for c in captions if not clean_caption(c))
    if not empty:
        return caption_file
    if (file_key, empty) not in EMPTY_SAID:
        EMPTY_SAID.add((file_key, empty))
        print("%d empty caption%s in %s left out" % (empty, "" if empty == 1 else "s", caption_file.source),
              file=sys.stderr)
    captions = OrderedDict((n, [c for c in caps if clean_caption(c)]) for n, caps in caption_file.captions.items())
    return CaptionFile(caption_file.source, caption_file.format, captions, caption_file.splits)


def _plain(data: dict, what: str) -> "OrderedDict[str, List[str]]":
    out = OrderedDict()
    for name, value in data.items():
        check_image_name(str(name), what, "key %r" % name)
        captions = [value] if isinstance(value, str) else list(value)
        if not captions:
            raise UserError("%s: image %r has an empty caption list" % (what, name))
        out[str(name)] = captions
    return out


def _read_karpathy(images: list, what: str) -> CaptionFile:
    if images and "file_name" in images[0] and "filename" not in images[0]:
        raise _unknown(what, "COCO-style \"images\" but no \"annotations\"")
    captions, splits = OrderedDict(), {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise UserError("%s: images[%d] lacks a string \"filename\" (Karpathy format)" % (what, i))
        name = os.path.join(str(image.get("filepath") or ""), image["filename"])
        check_image_name(name, what, "images[%d] (filepath %r, filename %r)" % (i, image.get("filepath") or "",
                                                                              image["filename"]))
        if image.get("split") not in KARPATHY_SPLITS:
            raise UserError("%s: images[%d] (%s) has split %r; expected one of %s" % (
                what, i, name, image.get("split"), ", ".join(KARPATHY_SPLITS)))
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and isinstance(s.get("raw"), str)
                                                      for s in sentences):
            raise UserError("%s: images[%d] (%s) needs \"sentences\": [{\"raw\": caption}...]" % (what, i, name))
        if not sentences:
            raise UserError("%s: images[%d] (%s) has an empty \"sentences\" list" % (what, i, name))
        if name in captions:
            raise UserError("%s: two images share the file name %r" % (what, name))
        captions[name] = [s["raw"] for s in sentences]
        splits[name] = KARPATHY_SPLITS[image["split"]]
    if not captions:
        raise UserError("%s holds no images (an empty \"images\" list)" % what)
    return CaptionFile(what, "karpathy", captions, splits)


def read_coco_captions(annotation: Union[str, dict], what: Optional[str] = None) -> "OrderedDict[str, List[str]]":
    """{image file name: its captions as written, in annotation order}, in the file's image order, from a COCO-style
    caption file (path or parsed dict), indexed by pycocotools; every problem is named with its place in the file."""
    from pycocotools.coco import COCO

    what = what or "annotation file %s" % (annotation if isinstance(annotation, str) else "(in memory)")
    data = read_json(annotation, "annotation file") if isinstance(annotation, str) else annotation
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise UserError("%s must be COCO-style: {\"images\": [{\"file_name\", \"id\"}...], "
                        "\"annotations\": [{\"image_id\", \"caption\"}...]}" % what)
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "file_name" not in image or "id" not in image:
            raise UserError("%s: images[%d] lacks \"file_name\" or \"id\"" % (what, i))
        check_image_name(str(image["file_name"]), what, "images[%d] (file_name %r)" % (i, image["file_name"]))
    ids = {image["id"] for image in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise UserError("%s: annotations[%d] lacks \"image_id\" or a string \"caption\"" % (what, i))
        if ann["image_id"] not in ids:
            raise UserError("%s: annotations[%d] refers to image_id %r, which is not in \"images\""
                            % (what, i, ann["image_id"]))
    coco = COCO()
    coco.dataset = dict(data, annotations=[dict(a, id=a.get("id", i)) for i, a in enumerate(data["annotations"])])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        coco.createIndex()
    out = OrderedDict()
    for image_id, info in coco.imgs.items():
        name = str(info["file_name"])
        if name in out:
            raise UserError("%s: two images share the file name %r" % (what, name))
        out[name] = [a["caption"] for a in coco.imgToAnns.get(image_id, [])]
    return out


def coco_captions(names: Sequence[str], captions: Sequence[Sequence[str]], info: Optional[dict] = None) -> dict:
    """A COCO caption file (what read_coco_captions reads, so p2_train.py --train-json takes it): image `names` as
    the image folder holds them, each with its captions in order; image and annotation ids count from 1."""
    if len(names) != len(captions):
        raise ValueError("%d images but %d caption lists" % (len(names), len(captions)))
    images = [dict(id=n + 1, file_name=name) for n, name in enumerate(names)]
    annotations = [dict(image_id=n + 1, caption=caption) for n, texts in enumerate(captions) for caption in texts]
    for n, annotation in enumerate(annotations):
        annotation["id"] = n + 1
    return dict(info=info or {}, images=images, annotations=annotations)


# ----------------------------------------------------------------------------------------------- splits

def in_val_fraction(name: str, val_fraction: float) -> bool:
    """Whether a file name falls in the val share of a file without splits: the first 8 bytes of its SHA-256 as a
    fraction of 2^64, so every machine and every run puts an image on the same side (Python's hash() is salted)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < val_fraction


def resolve_split(caption_file: CaptionFile, split: Optional[str], default_split: Optional[str]) -> Optional[str]:
    """The split asked for, else the role's default (train for training, val for scoring) where the file carries
    splits; a file without splits is then one whole split, so the course's train.json and val.json keep meaning."""
    if split is not None:
        return split
    return default_split if caption_file.splits is not None else None


def split_names(caption_file: CaptionFile, split: Optional[str], val_fraction: float = VAL_FRACTION,
                option: str = "--split", show: bool = True) -> Tuple[List[str], str]:
    """(the split's image names in file order, the split's name). `split` None is the whole of a file without
    splits (as the course's train.json and val.json are) and must not happen for a file with splits (callers pass
    their role's default). A file without splits asked for train or val is split by file-name hash; the counts
    go to stderr."""
    names, what = list(caption_file.captions), caption_file.source
    if split not in (None,) + SPLITS:
        raise UserError("%s %s: unknown split; choose one of %s" % (option, split, ", ".join(SPLITS)))
    if not 0 < val_fraction < 1:
        raise UserError("--val-fraction must be between 0 and 1, got %s" % val_fraction)
    if split in (None, "all"):
        return names, "all"
    if caption_file.splits is not None:
        chosen = [n for n in names if caption_file.splits[n] == split]
        counts = {s: sum(1 for n in names if caption_file.splits[n] == s) for s in ("train", "val", "test")}
        if not chosen:
            raise UserError("%s has no %s images (%s %s); it has %s" % (
                what, split, option, split, ", ".join("%s %d" % kv for kv in counts.items() if kv[1])))
        if show:
            print("%s: %s split, %d of %d images (%s)" % (what, split, len(chosen), len(names), ", ".join(
                "%s %d" % kv for kv in counts.items())), file=sys.stderr)
        return chosen, split
    if split == "test":
        raise UserError("%s carries no splits, so it has no test split (%s test); a file without splits divides "
                        "into train and val by --val-fraction" % (what, option))
    val = [n for n in names if in_val_fraction(n, val_fraction)]
    train = [n for n in names if not in_val_fraction(n, val_fraction)]
    chosen = val if split == "val" else train
    if not chosen:
        raise UserError("%s: --val-fraction %s leaves no %s images of %d; choose another fraction, or %s all "
                        "for the whole file" % (what, val_fraction, split, len(names), option))
    if show:
        print("%s: no splits in the file, divided by file-name hash (--val-fraction %s): %d train, %d val; %s "
              "takes %s" % (what, val_fraction, len(train), len(val), option, split), file=sys.stderr)
    return chosen, split


def load_captions(annotation_file: str, images_root: str, clean: bool = True, split: Optional[str] = None,
                  default_split: Optional[str] = None, val_fraction: float = VAL_FRACTION,
                  option: str = "--split") -> CaptionSet:
    """A split for training: the captioned images of a caption file in any format (they must all exist in
    `images_root`), sorted by file name, with their captions cleaned (clean_caption) unless `clean` is False.
    `split` None takes `default_split` from a file with splits and the whole of a file without. Images left with
    no caption are dropped, and stderr says how many."""
    caption_file = read_captions(annotation_file)
    if not os.path.isdir(images_root):
        raise UserError("image folder not found: %s (for %s)" % (images_root, annotation_file))
    chosen, split = split_names(caption_file, resolve_split(caption_file, split, default_split), val_fraction,
                                option)
    references = {n: [c.strip() for c in caption_file.captions[n] if c.strip()] for n in chosen}
    names = sorted(n for n in chosen if references[n])
    if not names:
        raise UserError("%s holds no captioned images%s" % (annotation_file, "" if split == "all" else
                                                               " in its %s split" % split))
    if len(names) < len(chosen):
        print("%s: %d image(s) without a caption left out" % (annotation_file, len(chosen) - len(names)),
              file=sys.stderr)
    missing = [n for n in names if not os.path.isfile(os.path.join(images_root, n))]
    if missing:
        raise UserError("%d image(s) of %s are not in %s, e.g. %s" % (len(missing), annotation_file, images_root,
                                                                      ", ".join(missing[:3])))
    keys: Dict[str, str] = {}
    for name in names:
        if keys.setdefault(image_key(name), name) != name:
            raise UserError("%s: %s and %s would share the prediction key %r (file names without folder and "
                            "extension must be unique)" % (annotation_file, keys[image_key(name)], name,
                                                           image_key(name)))
    captions = [[clean_caption(c) if clean else c for c in references[n]] for n in names]
    return CaptionSet(images_root, annotation_file, names, [[c for c in caps if c] for caps in captions],
                      [references[n] for n in names], split)


def find_images(images_root: str, caption_file: Optional[str] = None, split: Optional[str] = None,
                default_split: Optional[str] = None, val_fraction: float = VAL_FRACTION, option: str = "--split",
                what: str = "image folder") -> List[str]:
    """The one rule by which every entry point finds its images, as paths relative to `images_root`: a caption
    file's split as load_captions reads it (sub-folders from COCO's file_name or Karpathy's filepath, each image
    checked to exist), or without a caption file every image in the folder and its sub-folders. Two images that would
    share a prediction key (file name without folder and extension) are refused."""
    if caption_file:
        return load_captions(caption_file, images_root, split=split, default_split=default_split,
                             val_fraction=val_fraction, option=option).names
    names = list_images(images_root, what, recursive=True)
    keys: Dict[str, str] = {}
    for name in names:
        if keys.setdefault(image_key(name), name) != name:
            raise UserError("%s and %s in %s would share the key %r (file names without folder and extension must "
                            "be unique)" % (keys[image_key(name)], name, images_root, image_key(name)))
    return names
