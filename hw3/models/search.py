"""Caption search on the decoder's KV cache: the README's default decoding and how flags and a checkpoint's
recommended settings combine into the settings used; greedy, sampling and beam search, batched, with the n-gram ban
and the minimum length; and the replay that gives the cross-attention behind each generated token (P3).

Image keys/values are computed once per image (decoder.image_memory); each step feeds only the new token through the
KV cache; beams and sampled captions are batch rows, and rows whose search is over leave the batch.

Sampling is reproducible whatever the batch: each caption draws from its own stream of uniforms, seeded by SHA-256 of
(seed, image key, draw number), and takes at step t the token where the cumulative distribution passes its t-th
uniform. The image key is the prediction key (p2_inference) or, by default, the image's place in the call.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from hw3.util.errors import UserError
from hw3.data.tokenizer import END_TOKEN, BPETokenizer

# The decoding the README documents for hw3_2.sh; a checkpoint may recommend others (INFERENCE_KEY, below).
DECODE_DEFAULTS = dict(method="beam", beam_size=3, max_len=30, min_len=1, length_penalty=1.0, no_repeat_ngram=3)
# A checkpoint JSON's recommended inference decoding: {"method": ..., ..., "chosen_on": "what validation data and
# measure picked them"}. Only settings tuned for inference on validation data belong here; training's validation
# decoding is recorded elsewhere ("validation_decoding") and never used by inference.
INFERENCE_KEY = "inference"
# Sampling's settings (--method sample): softmax(log p / temperature) over the top_k most likely tokens (0: all) and
# the smallest set holding top_p of the mass (1.0: all); seed fixes the draws.
SAMPLING_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, seed=0)
METHODS = ("beam", "greedy", "sample")
# Settings added after checkpoints were shipped: a recommendation without them takes their default.
LATER_SETTINGS = ("min_len",) + tuple(SAMPLING_DEFAULTS)
BEAM_ONLY = ("beam_size", "length_penalty")  # flags that mean beam search: giving one alone asks for it
SAMPLING_ONLY = tuple(SAMPLING_DEFAULTS)  # flags that mean sampling: giving one alone asks for it
_ALL_DEFAULTS = dict(DECODE_DEFAULTS, **SAMPLING_DEFAULTS)
# A checkpoint JSON's record of its training captions' length (p2_train.py --max-caption-tokens, from the data by
# default): its decoding's max_len defaults to covering_max_len of it. Absent in older checkpoints (then 30, as ever).
DATA_LENGTH_KEY = "max_caption_tokens"


def covering_max_len(caption_tokens: int) -> int:
    """A decoding length that covers captions of `caption_tokens` tokens: one more for the end token, and never
    below the README's default, so data of short captions decode as they always did."""
    return max(DECODE_DEFAULTS["max_len"], int(caption_tokens) + 1)


# ----------------------------------------------------------------------------------------------- settings

def _checked_settings(settings: Dict[str, object], where: str, prefix: str = "") -> Dict[str, object]:
    out = {}
    for key, default in _ALL_DEFAULTS.items():
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
            raise UserError("%s: %s%s must be a finite number, got %s" % (where, prefix, key.replace("_", "-"), value))
        out[key] = type(default)(value)
    if out["method"] not in METHODS:
        raise UserError("%s: method must be %s or %s, got %r" % (where, ", ".join(METHODS[:-1]), METHODS[-1],
                                                                 out["method"]))
    for key, least in (("beam_size", 1), ("max_len", 1), ("min_len", 0), ("no_repeat_ngram", 0), ("top_k", 0)):
        if out[key] < least:
            raise UserError("%s: %s%s must be >= %d, got %s" % (where, prefix, key.replace("_", "-"), least,
                                                                 out[key]))
    if not out["temperature"] > 0:
        raise UserError("%s: %stemperature must be > 0, got %s" % (where, prefix, out["temperature"]))
    if not 0 < out["top_p"] <= 1:
        raise UserError("%s: %stop-p must be in (0, 1], got %s" % (where, prefix, out["top_p"]))
    if out["min_len"] > out["max_len"]:
        raise UserError("%s: min-len %d exceeds max-len %d" % (where, out["min_len"], out["max_len"]))
    return out


def caption_positions(meta: Optional[dict]) -> Optional[int]:
    """The most tokens a caption may have in a checkpoint's decoder (its block size less the prompt and the start
    token), from its config; None where the config does not say (GPT-2's 1024 positions are known once built)."""
    decoder = (meta or {}).get("decoder")
    if not isinstance(decoder, dict) or not isinstance(decoder.get("block_size"), int):
        return None
    return decoder["block_size"] - (decoder.get("prompt_len") or 0) - 1


def _check_block_size(settings: Dict[str, object], flags: Dict[str, object], meta: Optional[dict], where: str) -> None:
    """max_len and min_len within the decoder's text positions (the start token takes one), named with their origin:
    search would otherwise cut them silently."""
    most = caption_positions(meta)
    if most is None:
        return
    decoder = meta["decoder"]
    for key in ("max_len", "min_len"):
        if settings[key] > most:
            origin = "%s (command line)" % _flag(key) if key in flags else "%s: %s" % (where, key)
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
        % ", ".join("%s=%s" % kv for kv in _ALL_DEFAULTS.items()))
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


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _implied_method(flags: Dict[str, object]) -> Dict[str, object]:
    """Refuses flags that contradict the method; a beam-only or sampling-only flag alone asks for its method."""
    beam = [k for k in BEAM_ONLY if k in flags and (k != "beam_size" or flags[k] > 1)]
    sampling = [k for k in SAMPLING_ONLY if k in flags]
    method = flags.get("method")
    if method in ("greedy", "sample") and beam:
        raise UserError("--method %s contradicts %s, which only beam search uses"
                        % (method, " and ".join(map(_flag, beam))))
    if method in ("greedy", "beam") and sampling:
        raise UserError("--method %s contradicts %s, which only sampling uses"
                        % (method, " and ".join(map(_flag, sampling))))
    if method is None and beam and sampling:
        raise UserError("%s (beam search) contradicts %s (sampling): give --method"
                        % (" and ".join(map(_flag, beam)), " and ".join(map(_flag, sampling))))
    if method is None and any(k in flags for k in BEAM_ONLY) and flags.get("beam_size", 2) > 1:
        return dict(flags, method="beam")
    if method is None and sampling:
        return dict(flags, method="sample")
    return flags


def _checked_count(settings: Dict[str, object], count: int) -> int:
    """--captions-per-image: N draws when sampling, the N best beams of beam search, one greedy caption."""
    if count < 1:
        raise UserError("--captions-per-image must be >= 1, got %d" % count)
    if settings["method"] == "greedy" and count > 1:
        raise UserError("--captions-per-image %d: greedy search gives one caption per image (use --method sample, "
                        "or beam search with --beam-size >= %d)" % (count, count))
    if settings["method"] == "beam" and count > settings["beam_size"]:
        raise UserError("--captions-per-image %d exceeds --beam-size %d (beam search returns its best beams)"
                        % (count, settings["beam_size"]))
    return count


def resolve_decoding(given: Dict[str, object], meta: Optional[dict] = None,
                     where: str = "the checkpoint config") -> Tuple[Dict[str, object], str]:
    """The decoding settings to use and a line saying where each came from. Each given (non-None) flag takes effect
    on its own, over the checkpoint's recommended inference settings (meta[INFERENCE_KEY]), over DECODE_DEFAULTS and
    SAMPLING_DEFAULTS; a beam-only flag (--beam-size, --length-penalty) given without --method means beam search, a
    sampling-only one (--temperature, --top-k, --top-p, --seed) sampling. The settings hold only what the method
    uses (sampling's when sampling, beam_size and length_penalty when not), plus captions_per_image when `given`
    has it. `where` names the checkpoint's JSON in messages."""
    saved = (meta or {}).get(INFERENCE_KEY)
    origin = "%s (chosen on %s)" % (os.path.basename(where), saved.get("chosen_on")) if isinstance(saved, dict) \
        else "the README defaults"
    where = "%s (%r)" % (where, INFERENCE_KEY)
    required = [k for k in DECODE_DEFAULTS if k not in LATER_SETTINGS]
    if saved is not None and not (isinstance(saved, dict) and set(required) <= set(saved)
                                  and isinstance(saved.get("chosen_on"), str)):
        raise UserError("%s must hold %s and 'chosen_on' (the validation data that chose them)"
                        % (where, ", ".join(required)))
    unknown = sorted(set(saved or {}) - set(_ALL_DEFAULTS) - {"chosen_on"})
    if unknown:
        raise UserError("%s: unknown setting(s) %s (known: %s, chosen_on)" % (where, ", ".join(map(str, unknown)),
                                                                            ", ".join(_ALL_DEFAULTS)))
    defaults, data_origin = _data_defaults(meta or {})
    base = _checked_settings(dict(defaults, **saved), where) if saved else defaults
    flags = _implied_method({k: v for k, v in given.items() if k in _ALL_DEFAULTS and v is not None})
    settings = _checked_settings(dict(base, **flags), "decoding option", "--")
    _check_block_size(settings, flags, meta, where)
    unused = BEAM_ONLY if settings["method"] == "sample" else SAMPLING_ONLY
    settings = {k: v for k, v in settings.items() if k not in unused}
    if given.get("captions_per_image") is not None:
        settings["captions_per_image"] = _checked_count(settings, given["captions_per_image"])
    unsaved = [k for k in LATER_SETTINGS if saved and k in settings and k not in saved and k not in flags]
    said = ", ".join("%s=%s" % kv for kv in settings.items())
    parts = ["from the command line: %s" % ", ".join(sorted(flags))] if flags else []
    if unsaved:
        parts.append("%s: the README default (not in the checkpoint)" % ", ".join(unsaved))
    if data_origin and "max_len" not in flags and not saved:
        parts.append(data_origin)
    parts.append(("the rest from %s" if parts else "all from %s") % origin)
    return settings, "decoding: %s (%s)" % (said, "; ".join(parts))


def _data_defaults(meta: dict) -> Tuple[Dict[str, object], str]:
    """The defaults with max_len covering the checkpoint's recorded caption length (DATA_LENGTH_KEY), and a note
    saying so; the plain defaults and no note for a checkpoint that records none."""
    tokens, most = meta.get(DATA_LENGTH_KEY), caption_positions(meta)
    if tokens is None:  # a default beyond a small decoder's positions is its positions (a flag there is refused)
        return dict(_ALL_DEFAULTS, max_len=min(_ALL_DEFAULTS["max_len"], most or _ALL_DEFAULTS["max_len"])), ""
    if not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1):
        raise UserError("the checkpoint config's %r must be a whole number >= 1, got %r" % (DATA_LENGTH_KEY, tokens))
    max_len = min(covering_max_len(tokens), most or sys.maxsize)
    return dict(_ALL_DEFAULTS, max_len=max_len), "max_len=%d: covers the checkpoint's training captions (%s %d)" % (
        max_len, DATA_LENGTH_KEY, tokens)


def decode_captions(ids: List[List[int]], tokenizer: Optional[BPETokenizer] = None) -> List[str]:
    """Token ids (end token stripped, as generate returns them) -> caption texts."""
    tokenizer = tokenizer or BPETokenizer()
    return [tokenizer.decode(seq).strip() for seq in ids]


# ----------------------------------------------------------------------------------------------- search

def _ban_repeated_ngrams(logp: torch.Tensor, seqs: torch.Tensor, n: int) -> torch.Tensor:
    """Sets -inf on every token that would repeat an n-gram already in its row (start token included, as in
    Hugging Face's NoRepeatNGramLogitsProcessor). logp (R, V), seqs (R, t)."""
    if n <= 0 or seqs.shape[1] < n:
        return logp
    windows = seqs.unfold(1, n, 1)  # (R, t - n + 1, n)
    prefix = seqs[:, seqs.shape[1] - n + 1:]  # (R, n - 1): the n-gram the next token would complete
    match = (windows[:, :, :-1] == prefix.unsqueeze(1)).all(-1)  # (R, t - n + 1)
    rows, starts = match.nonzero(as_tuple=True)
    if rows.numel():
        logp = logp.index_put((rows, windows[rows, starts, -1]), torch.tensor(float("-inf"), device=logp.device))
    return logp


def _step_log_probs(decoder, seqs, memory, cache, no_repeat_ngram: int, end: int, end_allowed: bool) -> torch.Tensor:
    """Log-probs (R, V) over the decoder's outputs after feeding each row's last token. seqs (R, t) holds output
    indices (search works in the decoder's output space; GPT-2 ids go in and come out)."""
    logits = decoder(decoder.vocab.ids(seqs[:, -1:]), memory=memory, cache=cache)[:, -1]  # (R, V)
    logp = _ban_repeated_ngrams(F.log_softmax(logits.float(), dim=-1), seqs, no_repeat_ngram)
    if not end_allowed:  # min_len: after the softmax, as Hugging Face's MinNewTokensLengthLogitsProcessor
        logp[:, end] = float("-inf")
    return logp


def draw_uniforms(seed: int, keys: Sequence[str], captions_per_image: int, steps: int) -> torch.Tensor:
    """(len(keys) * captions_per_image, steps) uniforms in [0, 1), image-major: draw d of image `key` takes the
    stream of a generator seeded by SHA-256 of (seed, key, d), so its caption never depends on the batch."""
    rows = []
    for key in keys:
        for draw in range(captions_per_image):
            digest = hashlib.sha256(("%d\0%s\0%d" % (seed, key, draw)).encode("utf-8")).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
            rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(rows)


def sample_next_word(logp: torch.Tensor, uniform: Optional[torch.Tensor] = None, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The next token of each row of log-probs (R, V): the argmax without `uniform` (greedy), else a draw from
    softmax(logp / temperature) restricted to the top_k most likely tokens, then to the smallest set of most likely
    ones holding top_p of the mass (Hugging Face's warpers, in its order), taken where the row's cumulative
    distribution passes its uniform (R,) (ruotianluo's sample_next_word, with the randomness supplied per row)."""
    if uniform is None:
        return logp.argmax(-1)
    scaled = (logp - logp.max(-1, keepdim=True).values) / temperature  # the best token stays at 0, whatever T
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # (R, 1); ties with the k-th stay, as in Hugging Face
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled.double(), dim=-1)  # (R, V); float64 so the CDF of 50k tokens keeps small ones
    if top_p < 1.0:
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # mass of the more likely tokens; the most likely always stays
        probs = probs.scatter(-1, order, ordered.masked_fill(before >= top_p, 0.0))
    cdf = probs.cumsum(-1)  # (R, V)
    total = cdf[:, -1:]  # (R, 1): the kept mass; the point stays below it, so a token of positive probability is hit
    point = torch.minimum(uniform.to(cdf.device).unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(1)  # the first token whose cdf exceeds the point


def _sample(decoder, memory, rows: int, max_len: int, min_len: int, no_repeat_ngram: int, device,
            uniforms: Optional[torch.Tensor] = None, **warp) -> List[Tuple[List[int], bool]]:
    """One caption per row, token by token: the argmax (greedy) or, with `uniforms` (rows, max_len), a draw per
    step (sample_next_word with `warp`: temperature, top_k, top_p). Finished captions leave the batch, so later
    steps only compute the ones still running."""
    results: List[Optional[Tuple[List[int], bool]]] = [None] * rows
    alive = torch.arange(rows, device=device)  # original index of each running row
    end = decoder.vocab.end_index
    seqs = torch.full((rows, 1), end, dtype=torch.long, device=device)  # (R, 1 + steps) output indices
    cache = decoder.new_cache()
    for step in range(max_len):
        logp = _step_log_probs(decoder, seqs, memory, cache, no_repeat_ngram, end, step >= min_len)
        uniform = None if uniforms is None else uniforms[alive.cpu(), step]
        seqs = torch.cat([seqs, sample_next_word(logp, uniform, **warp).unsqueeze(1)], dim=1)
        ended = seqs[:, -1] == end
        if ended.any():
            for row in ended.nonzero(as_tuple=True)[0].tolist():
                results[int(alive[row])] = (decoder.vocab.ids(seqs[row, 1:-1]).tolist(), True)
            keep = (~ended).nonzero(as_tuple=True)[0]
            alive, seqs = alive[keep], seqs[keep]
            if not len(alive):
                break
            memory, cache = memory.index_select(keep), cache.index_select(keep)
    for row, index in enumerate(alive.tolist()):
        results[index] = (decoder.vocab.ids(seqs[row, 1:]).tolist(), False)
    return results


def _beam(decoder, memory, batch: int, beam_size: int, max_len: int, min_len: int, length_penalty: float,
          no_repeat_ngram: int, device, count: int = 1) -> List[Tuple[List[int], bool]]:
    """Beam search with Hugging Face's rules (2K candidates per step, a hypothesis ends at the end token with score
    sum(log p) / length ** length_penalty, stop when K are done and no running beam can beat them), batched with
    beams as the batch dimension; images whose search is over leave the batch. Returns the best `count` finished
    hypotheses of each image, best first (Hugging Face's num_return_sequences)."""
    K = beam_size
    finished: List[List[Tuple[float, List[int], bool]]] = [[] for _ in range(batch)]
    alive = torch.arange(batch, device=device)  # original index of each running image
    memory = memory.repeat_interleave(K)
    end = decoder.vocab.end_index
    seqs = torch.full((batch * K, 1), end, dtype=torch.long, device=device)  # (A * K, 1 + steps) output indices
    scores = torch.zeros(batch, K, device=device)  # (A, K) running sum of log-probs
    scores[:, 1:] = -1e9  # all beams start equal: only the first may expand
    cache = decoder.new_cache()
    for step in range(max_len):
        A = len(alive)
        logp = _step_log_probs(decoder, seqs, memory, cache, no_repeat_ngram, end, step >= min_len)  # (A * K, V)
        vocab = logp.shape[-1]
        candidates = (logp + scores.view(-1, 1)).view(A, K * vocab)
        top_scores, top_index = candidates.topk(2 * K, dim=1)  # (A, 2K), best first
        beam = torch.div(top_index, vocab, rounding_mode="floor")  # (A, 2K); `//` warns on torch 1.12
        source = beam + torch.arange(A, device=device).unsqueeze(1) * K  # (A, 2K) rows of seqs
        token = top_index % vocab
        ends = token == end
        last = step == max_len - 1
        length = step + 1  # generated tokens, the end token included
        # Only the first K candidates may finish (the rest exist so that K beams can keep running).
        done_a, done_c = (torch.ones_like(ends) if last else ends)[:, :K].nonzero(as_tuple=True)
        for a, c in zip(done_a.tolist(), done_c.tolist()):
            hyps = finished[alive[a]]
            ended = bool(ends[a, c])
            ids = decoder.vocab.ids(seqs[source[a, c], 1:]).tolist() + (
                [] if ended else [int(decoder.vocab.ids(token[a, c]))])
            hyps.append((float(top_scores[a, c]) / length ** length_penalty, ids, ended))
            hyps.sort(key=lambda h: -h[0])
            del hyps[K:]
        if last:
            break
        # (A, K): the best K that did not end (at most K of the 2K candidates end: one end token per beam)
        running = top_scores.masked_fill(ends, float("-inf")).topk(K, dim=1).indices
        scores = top_scores.gather(1, running)
        rows = source.gather(1, running).view(-1)
        next_tokens = token.gather(1, running).view(-1, 1)
        best_possible = scores[:, 0] / length ** length_penalty
        over = [len(finished[i]) == K and float(best_possible[a]) <= finished[i][-1][0]
                for a, i in enumerate(alive.tolist())]
        keep = torch.tensor([not o for o in over], device=device)
        if not keep.any():
            break
        if not keep.all():
            kept = keep.nonzero(as_tuple=True)[0]
            kept_rows = (kept.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)
            alive, scores = alive[kept], scores[kept]
            rows, next_tokens = rows.view(A, K)[kept].view(-1), next_tokens.view(A, K)[kept].view(-1, 1)
            memory = memory.index_select(kept_rows)
        seqs = torch.cat([seqs.index_select(0, rows), next_tokens], dim=1)
        cache = cache.index_select(rows)
    return [(ids, ended) for hyps in finished for _, ids, ended in hyps[:count]]


def _replay_attention(decoder, image_tokens: torch.Tensor, results: List[Tuple[List[int], bool]]):
    """Cross-attention of each generated token, from one teacher-forced pass over the chosen captions: with a causal
    decoder, position j sees exactly what the generation step that produced token j + 1 saw."""
    inputs = [[END_TOKEN] + (ids if ended else ids[:-1]) for ids, ended in results]
    width = max(len(seq) for seq in inputs)
    tokens = torch.full((len(inputs), width), END_TOKEN, dtype=torch.long, device=image_tokens.device)
    for i, seq in enumerate(inputs):
        tokens[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    _, attentions = decoder(tokens, memory=decoder.image_memory(image_tokens), return_attention=True)
    return [[None if a is None else a[i, :, :len(seq)].float().cpu() for a in attentions]  # (n_head, L, N)
            for i, seq in enumerate(inputs)]


def effective_max_len(decoder, max_len: int) -> int:
    """The length generate stops at: max_len, within the decoder's positions (the start token takes one)."""
    return min(max_len, decoder.max_text_len - 1)


@torch.no_grad()
def generate(decoder, image_tokens: torch.Tensor, method: str = DECODE_DEFAULTS["method"],
             beam_size: int = DECODE_DEFAULTS["beam_size"], max_len: int = DECODE_DEFAULTS["max_len"],
             min_len: int = DECODE_DEFAULTS["min_len"], length_penalty: float = DECODE_DEFAULTS["length_penalty"],
             no_repeat_ngram: int = DECODE_DEFAULTS["no_repeat_ngram"],
             temperature: float = SAMPLING_DEFAULTS["temperature"], top_k: int = SAMPLING_DEFAULTS["top_k"],
             top_p: float = SAMPLING_DEFAULTS["top_p"], seed: int = SAMPLING_DEFAULTS["seed"],
             captions_per_image: int = 1, image_keys: Optional[Sequence[str]] = None, return_attention: bool = False,
             return_ended: bool = False):
    """Captions as token ids (end token stripped) for a batch of image tokens (B, N, encoder_dim); the end token is
    banned until min_len tokens were generated (1: never an empty caption). With captions_per_image C > 1 the list
    holds B * C captions, image-major: C draws of sampling, or the C best beams (C <= beam_size).

    Sampling's draws for an image depend on (seed, its key in `image_keys`, the draw number) only; without keys an
    image's key is its place in this batch, so pass keys for captions that do not depend on the batching.

    Image keys/values are computed once per image (decoder.image_memory); each step feeds only the new token through
    the KV cache. return_attention=True also returns, per caption, a list over decoder blocks (None where a block
    has no cross-attention) of (n_head, L, N) probabilities: row j is the step that produced token j, and a last row
    the step that produced the end token when the caption ended. return_ended=True also returns (last) whether each
    caption ended with the end token; one that did not was cut at max_len."""
    if method not in METHODS:
        raise ValueError("method must be one of %s, got %r" % (METHODS, method))
    if beam_size < 1 or max_len < 1 or min_len < 0:
        raise ValueError("beam_size and max_len must be >= 1 and min_len >= 0, got %d, %d and %d"
                         % (beam_size, max_len, min_len))
    if captions_per_image < 1 or (method == "greedy" and captions_per_image > 1) or (
            method == "beam" and captions_per_image > beam_size):
        raise ValueError("captions_per_image %d: greedy gives 1, beam search at most beam_size (%d)"
                         % (captions_per_image, beam_size))
    if not (temperature > 0 and top_k >= 0 and 0 < top_p <= 1):
        raise ValueError("sampling needs temperature > 0, top_k >= 0 and top_p in (0, 1], got %s, %s and %s"
                         % (temperature, top_k, top_p))
    batch, device = image_tokens.shape[0], image_tokens.device
    keys = [str(i) for i in range(batch)] if image_keys is None else [str(k) for k in image_keys]
    if len(keys) != batch:
        raise ValueError("%d image keys for %d images" % (len(keys), batch))
    max_len = effective_max_len(decoder, max_len)
    was_training = decoder.training
    decoder.eval()
    try:
        memory = decoder.image_memory(image_tokens)
        if method == "beam":
            results = _beam(decoder, memory, batch, beam_size, max_len, min_len, length_penalty, no_repeat_ngram,
                            device, captions_per_image)
        elif method == "greedy":
            results = _sample(decoder, memory, batch, max_len, min_len, no_repeat_ngram, device)
        else:
            rows = batch * captions_per_image
            if captions_per_image > 1:
                memory = memory.repeat_interleave(captions_per_image)
            results = _sample(decoder, memory, rows, max_len, min_len, no_repeat_ngram, device,
                              draw_uniforms(seed, keys, captions_per_image, max_len), temperature=temperature,
                              top_k=top_k, top_p=top_p)
        outputs = [[seq for seq, _ in results]]
        if return_attention:
            if captions_per_image > 1:
                image_tokens = image_tokens.repeat_interleave(captions_per_image, dim=0)
            outputs.append(_replay_attention(decoder, image_tokens, results))
        if return_ended:
            outputs.append([ended for _, ended in results])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
    finally:
        decoder.train(was_training)
