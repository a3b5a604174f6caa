"""The decoding settings as one object: the README's default decoding, their checks, the command line's decoding
options and how flags and a checkpoint's recommended settings combine into the settings used (resolve_decoding).
search.generate takes a DecodingSettings; the pipeline turns one back into flags with as_flags."""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from hw3.util.config import flag_name
from hw3.util.errors import UserError

METHODS = ("beam", "greedy", "sample")


@dataclass(frozen=True)
class DecodingSettings:
    """How search.generate captions. Sampling (method "sample") draws from softmax(log p / temperature) over the
    top_k most likely tokens (0: all) and the smallest set holding top_p of the mass (1.0: all); seed fixes the
    draws. captions_per_image: the N draws of sampling or the N best beams, one greedy caption. The defaults are the
    README's decoding for hw3_2.sh; checked when made, so a wrong setting fails before any model runs."""
    method: str = "beam"
    beam_size: int = 3
    max_len: int = 30
    min_len: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram: int = 3
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    captions_per_image: int = 1

    def __post_init__(self):
        checked_values(self.values(), "decoding settings")
        _checked_count(self, self.captions_per_image)

    @classmethod
    def from_record(cls, record: Dict[str, object]) -> "DecodingSettings":
        """The settings a record holds (a results row, a checkpoint's "inference"), its other keys (chosen_on,
        scores) aside; the settings it lacks take their defaults."""
        return cls(**{k: v for k, v in record.items() if k in FIELDS})

    def values(self) -> Dict[str, object]:
        """Every setting but captions_per_image (a request of the caller, not a way of decoding)."""
        return {k: getattr(self, k) for k in ALL_DEFAULTS}

    def as_record(self) -> Dict[str, object]:
        """The settings the method uses (sampling's when sampling, beam_size and length_penalty when not), as
        records, checkpoints' "inference" and the decoding line hold them."""
        unused = BEAM_ONLY if self.method == "sample" else SAMPLING_ONLY
        return {k: v for k, v in self.values().items() if k not in unused}

    def as_flags(self) -> List[str]:
        """Every setting the method uses as add_decoding_arguments' flags (so a checkpoint's own recommendation never
        enters); greedy takes no beam flags."""
        flags = ["--method", self.method, "--max-len", str(self.max_len), "--min-len", str(self.min_len),
                 "--no-repeat-ngram", str(self.no_repeat_ngram)]
        keys = BEAM_ONLY if self.method == "beam" else SAMPLING_ONLY if self.method == "sample" else ()
        return flags + [f for key in keys for f in (flag_name(key), str(getattr(self, key)))]

    def replace(self, **changes) -> "DecodingSettings":
        return dataclasses.replace(self, **changes)


# A checkpoint JSON's recommended inference decoding: {"method": ..., ..., "chosen_on": "what validation data and
# measure picked them"}. Only settings tuned for inference on validation data belong here; training's validation
# decoding is recorded elsewhere ("validation_decoding") and never used by inference.
INFERENCE_KEY = "inference"
BEAM_ONLY = ("beam_size", "length_penalty")  # flags that mean beam search: giving one alone asks for it
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "seed")  # flags that mean sampling: giving one alone asks for it
FIELDS = tuple(f.name for f in dataclasses.fields(DecodingSettings))
ALL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DecodingSettings) if f.name != "captions_per_image"}
# The decoding the README documents for hw3_2.sh (a checkpoint may recommend others under INFERENCE_KEY).
DECODE_DEFAULTS = {k: v for k, v in ALL_DEFAULTS.items() if k not in SAMPLING_ONLY}
# Settings added after checkpoints were shipped: a recommendation without them takes their default.
LATER_SETTINGS = ("min_len",) + SAMPLING_ONLY
# A checkpoint JSON's record of its training captions' length (p2_train.py --max-caption-tokens, from the data by
# default): its decoding's max_len defaults to covering_max_len of it. Absent in older checkpoints (then 30, as ever).
DATA_LENGTH_KEY = "max_caption_tokens"


def covering_max_len(caption_tokens: int) -> int:
    """A decoding length that covers captions of `caption_tokens` tokens: one more for the end token, and never
    below the README's default, so data of short captions decode as they always did."""
    return max(DECODE_DEFAULTS["max_len"], int(caption_tokens) + 1)


def checked_values(settings: Dict[str, object], where: str, prefix: str = "") -> Dict[str, object]:
    """Every setting of ALL_DEFAULTS of its type, finite and in its range, or a UserError naming `where`."""
    out = {}
    for key, default in ALL_DEFAULTS.items():
        value = settings[key]
        if isinstance(default, str):
            fits = isinstance(value, str)
        else:  # a number; an integer setting takes only whole numbers
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                isinstance(default, float) or float(value).is_integer())
        if not fits:
            kind = {str: "text", int: "whole number", float: "number"}[type(default)]
            raise UserError("%s: %s must be a %s, got %r" % (where, key, kind, value))
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError("%s: %s%s must be a finite number, got %s" % (where, prefix, flag_name(key)[2:], value))
        out[key] = type(default)(value)
    _check_ranges(out, where, prefix)
    return out


def _check_ranges(out: Dict[str, object], where: str, prefix: str) -> None:
    if out["method"] not in METHODS:
        raise UserError("%s: method must be %s or %s, got %r" % (where, ", ".join(METHODS[:-1]), METHODS[-1],
                                                                 out["method"]))
    for key, least in (("beam_size", 1), ("max_len", 1), ("min_len", 0), ("no_repeat_ngram", 0), ("top_k", 0)):
        if out[key] < least:
            raise UserError("%s: %s%s must be >= %d, got %s" % (where, prefix, flag_name(key)[2:], least,
                                                                 out[key]))
    if not out["temperature"] > 0:
        raise UserError("%s: %stemperature must be > 0, got %s" % (where, prefix, out["temperature"]))
    if not 0 < out["top_p"] <= 1:
        raise UserError("%s: %stop-p must be in (0, 1], got %s" % (where, prefix, out["top_p"]))
    if out["min_len"] > out["max_len"]:
        raise UserError("%s: min-len %d exceeds max-len %d" % (where, out["min_len"], out["max_len"]))


def _checked_count(settings: DecodingSettings, count: int) -> int:
    """--captions-per-image: N draws when sampling, the N best beams of beam search, one greedy caption."""
    if count < 1:
        raise UserError("--captions-per-image must be >= 1, got %d" % count)
    if settings.method == "greedy" and count > 1:
        raise UserError("--captions-per-image %d: greedy search gives one caption per image (use --method sample, "
                        "or beam search with --beam-size >= %d)" % (count, count))
    if settings.method == "beam" and count > settings.beam_size:
        raise UserError("--captions-per-image %d exceeds --beam-size %d (beam search returns its best beams)"
                        % (count, settings.beam_size))
    return count


DEFAULT_DECODING = DecodingSettings()


def caption_positions(meta: Optional[dict]) -> Optional[int]:
    """The most tokens a caption may have in a checkpoint's decoder (its block size less the prompt and the start
    token), from its config; None where the config does not say (GPT-2's 1024 positions are known once built)."""
    decoder = (meta or {}).get("decoder")
    if not isinstance(decoder, dict) or not isinstance(decoder.get("block_size"), int):
        return None
    return decoder["block_size"] - (decoder.get("prompt_len") or 0) - 1


def within_positions(settings: DecodingSettings, meta: Optional[dict]) -> DecodingSettings:
    """max_len and min_len cut to a checkpoint's decoder positions (a small from-scratch decoder trained on short
    captions), where a flag beyond would be refused."""
    most = caption_positions(meta) or sys.maxsize
    return settings.replace(max_len=min(int(settings.max_len), most), min_len=min(int(settings.min_len), most))


def _check_block_size(settings: Dict[str, object], flags: Dict[str, object], meta: Optional[dict], where: str) -> None:
    """max_len and min_len within the decoder's text positions (the start token takes one), named with their origin:
    search would otherwise cut them silently."""
    most = caption_positions(meta)
    if most is None:
        return
    decoder = meta["decoder"]
    for key in ("max_len", "min_len"):
        if settings[key] > most:
            origin = "%s (command line)" % flag_name(key) if key in flags else "%s: %s" % (where, key)
            raise UserError("%s %d is beyond the decoder's block size: at most %d tokens per caption (block_size %d%s)"
                            % (origin, settings[key], most, decoder["block_size"], ", less the prompt" if
                               decoder.get("prompt_len") else ""))


def add_decoding_arguments(parser) -> None:
    """The decoding options of every script that captions (p2_inference.py, p3_visualize.py); all default to None,
    so resolve_decoding can tell a given flag from an absent one."""
    group = parser.add_argument_group(
        "decoding", "each option given takes effect on its own (--beam-size or --length-penalty alone means beam "
        "search, --temperature, --top-k, --top-p or --seed alone means sampling); the rest come from the "
        "checkpoint's recommended inference settings if it has them, else: %s"
        % ", ".join("%s=%s" % kv for kv in ALL_DEFAULTS.items()))
    group.add_argument("--method", choices=METHODS, help="search method")
    group.add_argument("--beam-size", type=int, help="beams per image")
    group.add_argument("--max-len", type=int, help="most tokens per caption, end token included")
    group.add_argument("--min-len", type=int,
                       help="fewest tokens before the end token may come (1: never an empty caption; 0: no minimum, "
                            "as Hugging Face's generate)")
    group.add_argument("--length-penalty", type=float,
                       help="beam score = sum(log p) / length ** this (> 0 favours longer captions)")
    group.add_argument("--no-repeat-ngram", type=int, help="forbid repeating n-grams of this size (0 = off)")
    group.add_argument("--temperature", type=float, help="sampling: draw from softmax(log p / this), > 0")
    group.add_argument("--top-k", type=int, help="sampling: only the k most likely tokens (0 = all)")
    group.add_argument("--top-p", type=float,
                       help="sampling: only the smallest set of most likely tokens holding this much probability, "
                            "in (0, 1] (1 = all)")
    group.add_argument("--seed", type=int, help="sampling: the seed; a caption depends only on it, the image's key "
                                                "and its draw number, never on the batch")


def _implied_method(flags: Dict[str, object]) -> Dict[str, object]:
    """Refuses flags that contradict the method; a beam-only or sampling-only flag alone asks for its method."""
    beam = [k for k in BEAM_ONLY if k in flags and (k != "beam_size" or flags[k] > 1)]
    sampling = [k for k in SAMPLING_ONLY if k in flags]
    method = flags.get("method")
    if method in ("greedy", "sample") and beam:
        raise UserError("--method %s contradicts %s, which only beam search uses"
                        % (method, " and ".join(map(flag_name, beam))))
    if method in ("greedy", "beam") and sampling:
        raise UserError("--method %s contradicts %s, which only sampling uses"
                        % (method, " and ".join(map(flag_name, sampling))))
    if method is None and beam and sampling:
        raise UserError("%s (beam search) contradicts %s (sampling): give --method"
                        % (" and ".join(map(flag_name, beam)), " and ".join(map(flag_name, sampling))))
    if method is None and any(k in flags for k in BEAM_ONLY) and flags.get("beam_size", 2) > 1:
        return dict(flags, method="beam")
    if method is None and sampling:
        return dict(flags, method="sample")
    return flags


def _saved_settings(meta: Optional[dict], where: str) -> Optional[dict]:
    """The checkpoint's recommended inference settings (meta[INFERENCE_KEY]), checked for their keys."""
    saved = (meta or {}).get(INFERENCE_KEY)
    required = [k for k in DECODE_DEFAULTS if k not in LATER_SETTINGS]
    if saved is not None and not (isinstance(saved, dict) and set(required) <= set(saved)
                                  and isinstance(saved.get("chosen_on"), str)):
        raise UserError("%s must hold %s and 'chosen_on' (the validation data that chose them)"
                        % (where, ", ".join(required)))
    unknown = sorted(set(saved or {}) - set(ALL_DEFAULTS) - {"chosen_on"})
    if unknown:
        raise UserError("%s: unknown setting(s) %s (known: %s, chosen_on)" % (where, ", ".join(map(str, unknown)),
                                                                            ", ".join(ALL_DEFAULTS)))
    return saved


def resolve_decoding(given: Dict[str, object], meta: Optional[dict] = None,
                     where: str = "the checkpoint config") -> Tuple[DecodingSettings, str]:
    """The decoding settings to use and a line saying where each came from. Each given (non-None) flag takes effect
    on its own, over the checkpoint's recommended inference settings (meta[INFERENCE_KEY]), over the defaults; a
    beam-only flag (--beam-size, --length-penalty) given without --method means beam search, a sampling-only one
    (--temperature, --top-k, --top-p, --seed) sampling. Settings the method does not use keep their defaults;
    captions_per_image is taken from `given` when there. `where` names the checkpoint's JSON in messages."""
    saved = (meta or {}).get(INFERENCE_KEY)
    origin = "%s (chosen on %s)" % (os.path.basename(where), saved.get("chosen_on")) if isinstance(saved, dict) \
        else "the README defaults"
    where = "%s (%r)" % (where, INFERENCE_KEY)
    saved = _saved_settings(meta, where)
    defaults, data_origin = _data_defaults(meta or {})
    base = checked_values(dict(defaults, **saved), where) if saved else defaults
    flags = _implied_method({k: v for k, v in given.items() if k in ALL_DEFAULTS and v is not None})
    chosen = checked_values(dict(base, **flags), "decoding option", "--")
    _check_block_size(chosen, flags, meta, where)
    count = given.get("captions_per_image")
    record = DecodingSettings(**chosen).as_record()
    settings = DecodingSettings(**record) if count is None else DecodingSettings(captions_per_image=count, **record)
    said = ", ".join("%s=%s" % kv for kv in record.items()) + ("" if count is None else
                                                               ", captions_per_image=%s" % count)
    return settings, "decoding: %s (%s)" % (said, _origins(flags, saved, record, data_origin, origin))


def _origins(flags: dict, saved: Optional[dict], record: dict, data_origin: str, origin: str) -> str:
    unsaved = [k for k in LATER_SETTINGS if saved and k in record and k not in saved and k not in flags]
    parts = ["from the command line: %s" % ", ".join(sorted(flags))] if flags else []
    if unsaved:
        parts.append("%s: the README default (not in the checkpoint)" % ", ".join(unsaved))
    if data_origin and "max_len" not in flags and not saved:
        parts.append(data_origin)
    parts.append(("the rest from %s" if parts else "all from %s") % origin)
    return "; ".join(parts)


def _data_defaults(meta: dict) -> Tuple[Dict[str, object], str]:
    """The defaults with max_len covering the checkpoint's recorded caption length (DATA_LENGTH_KEY), and a note
    saying so; the plain defaults and no note for a checkpoint that records none."""
    tokens, most = meta.get(DATA_LENGTH_KEY), caption_positions(meta)
    if tokens is None:  # a default beyond a small decoder's positions is its positions (a flag there is refused)
        return dict(ALL_DEFAULTS, max_len=min(ALL_DEFAULTS["max_len"], most or ALL_DEFAULTS["max_len"])), ""
    if not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1):
        raise UserError("the checkpoint config's %r must be a whole number >= 1, got %r" % (DATA_LENGTH_KEY, tokens))
    max_len = min(covering_max_len(tokens), most or sys.maxsize)
    return dict(ALL_DEFAULTS, max_len=max_len), "max_len=%d: covers the checkpoint's training captions (%s %d)" % (
        max_len, DATA_LENGTH_KEY, tokens)
