"""Caption search on the decoder's KV cache: the README's default decoding and how flags and a checkpoint's
recommended settings combine into the settings used; greedy and beam search, batched, with the n-gram ban and the
minimum length; and the replay that gives the cross-attention behind each generated token (P3).

Image keys/values are computed once per image (decoder.image_memory); each step feeds only the new token through the
KV cache; beams are batch rows, and images whose search is over leave the batch.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from common import UserError
from tokenizer import END_TOKEN, BPETokenizer

# The decoding the README documents for hw3_2.sh; a checkpoint may recommend others (INFERENCE_KEY, below).
DECODE_DEFAULTS = dict(method="beam", beam_size=3, max_len=30, min_len=1, length_penalty=1.0, no_repeat_ngram=3)
# A checkpoint JSON's recommended inference decoding: {"method": ..., ..., "chosen_on": "what validation data and
# measure picked them"}. Only settings tuned for inference on validation data belong here; training's validation
# decoding is recorded elsewhere ("validation_decoding") and never used by inference.
INFERENCE_KEY = "inference"
# Settings added after checkpoints were shipped: a recommendation without them takes their default.
LATER_SETTINGS = ("min_len",)
BEAM_ONLY = ("beam_size", "length_penalty")  # flags that mean beam search: giving one alone asks for it


# ----------------------------------------------------------------------------------------------- settings

def _checked_settings(settings: Dict[str, object], where: str) -> Dict[str, object]:
    out = {}
    for key, default in DECODE_DEFAULTS.items():
        value = settings[key]
        if isinstance(default, str):
            fits = isinstance(value, str)
        else:  # a number; an integer setting takes only whole numbers
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                isinstance(default, float) or float(value).is_integer())
        if not fits:
            kind = {str: "text", int: "whole number", float: "number"}[type(default)]
            raise UserError("%s: %s must be a %s, got %r" % (where, key, kind, value))
        out[key] = type(default)(value)
    if out["method"] not in ("beam", "greedy"):
        raise UserError("%s: method must be beam or greedy, got %r" % (where, out["method"]))
    for key, least in (("beam_size", 1), ("max_len", 1), ("min_len", 0), ("no_repeat_ngram", 0)):
        if out[key] < least:
            raise UserError("%s: %s must be >= %d, got %s" % (where, key.replace("_", "-"), least, out[key]))
    if out["min_len"] > out["max_len"]:
        raise UserError("%s: min-len %d exceeds max-len %d" % (where, out["min_len"], out["max_len"]))
    return out


def add_decoding_arguments(parser) -> None:
    """The decoding options of every script that captions (p2_inference.py, p3_visualize.py); all default to None,
    so resolve_decoding can tell a given flag from an absent one."""
    group = parser.add_argument_group(
        "decoding", "each option given takes effect on its own (--beam-size or --length-penalty alone means beam "
        "search); the rest come from the checkpoint's recommended inference settings if it has them, else: %s"
        % ", ".join("%s=%s" % kv for kv in DECODE_DEFAULTS.items()))
    group.add_argument("--method", choices=("beam", "greedy"), help="search method")
    group.add_argument("--beam-size", type=int, help="beams per image")
    group.add_argument("--max-len", type=int, help="most tokens per caption, end token included")
    group.add_argument("--min-len", type=int,
                       help="fewest tokens before the end token may come (1: never an empty caption; 0: no minimum, "
                            "as Hugging Face's generate)")
    group.add_argument("--length-penalty", type=float,
                       help="beam score = sum(log p) / length ** this (> 0 favours longer captions)")
    group.add_argument("--no-repeat-ngram", type=int, help="forbid repeating n-grams of this size (0 = off)")


def resolve_decoding(given: Dict[str, object], meta: Optional[dict] = None,
                     where: str = "the checkpoint config") -> Tuple[Dict[str, object], str]:
    """The decoding settings to use and a line saying where each came from. Each given (non-None) flag takes effect
    on its own, over the checkpoint's recommended inference settings (meta[INFERENCE_KEY]), over DECODE_DEFAULTS; a
    beam-only flag (--beam-size, --length-penalty) given without --method means beam search. `where` names the
    checkpoint's JSON in messages."""
    saved = (meta or {}).get(INFERENCE_KEY)
    origin = "%s (chosen on %s)" % (os.path.basename(where), saved.get("chosen_on")) if isinstance(saved, dict) \
        else "the README defaults"
    where = "%s (%r)" % (where, INFERENCE_KEY)
    required = [k for k in DECODE_DEFAULTS if k not in LATER_SETTINGS]
    if saved is not None and not (isinstance(saved, dict) and set(required) <= set(saved)
                                  and isinstance(saved.get("chosen_on"), str)):
        raise UserError("%s must hold %s and 'chosen_on' (the validation data that chose them)"
                        % (where, ", ".join(required)))
    base = _checked_settings(dict(DECODE_DEFAULTS, **saved), where) if saved else dict(DECODE_DEFAULTS)
    flags = {k: v for k, v in given.items() if k in DECODE_DEFAULTS and v is not None}
    unsaved = [k for k in LATER_SETTINGS if saved and k not in saved and k not in flags]
    if flags.get("method") == "greedy" and (flags.get("beam_size", 1) > 1 or "length_penalty" in flags):
        raise UserError("--method greedy contradicts %s, which only beam search uses" % " and ".join(
            "--" + k.replace("_", "-") for k in BEAM_ONLY if k in flags and (k != "beam_size" or flags[k] > 1)))
    if "method" not in flags and any(k in flags for k in BEAM_ONLY) and flags.get("beam_size", 2) > 1:
        flags["method"] = "beam"
    settings = _checked_settings(dict(base, **flags), "decoding option")
    said = ", ".join("%s=%s" % kv for kv in settings.items())
    parts = ["from the command line: %s" % ", ".join(sorted(flags))] if flags else []
    if unsaved:
        parts.append("%s: the README default (the checkpoint predates it)" % ", ".join(unsaved))
    parts.append(("the rest from %s" if parts else "all from %s") % origin)
    return settings, "decoding: %s (%s)" % (said, "; ".join(parts))


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


def _step_log_probs(decoder, tokens, memory, cache, seqs, no_repeat_ngram: int, end_allowed: bool) -> torch.Tensor:
    logits = decoder(tokens, memory=memory, cache=cache)[:, -1]  # (R, V)
    logp = _ban_repeated_ngrams(F.log_softmax(logits.float(), dim=-1), seqs, no_repeat_ngram)
    if not end_allowed:  # min_len: after the softmax, as Hugging Face's MinNewTokensLengthLogitsProcessor
        logp[:, END_TOKEN] = float("-inf")
    return logp


def _greedy(decoder, memory, batch: int, max_len: int, min_len: int, no_repeat_ngram: int,
            device) -> List[Tuple[List[int], bool]]:
    """Argmax decoding; finished captions leave the batch, so later steps only compute the ones still running."""
    results: List[Optional[Tuple[List[int], bool]]] = [None] * batch
    alive = torch.arange(batch, device=device)  # original index of each running row
    seqs = torch.full((batch, 1), END_TOKEN, dtype=torch.long, device=device)  # (R, 1 + steps)
    cache = decoder.new_cache()
    for step in range(max_len):
        logp = _step_log_probs(decoder, seqs[:, -1:], memory, cache, seqs, no_repeat_ngram, step >= min_len)
        seqs = torch.cat([seqs, logp.argmax(-1, keepdim=True)], dim=1)
        ended = seqs[:, -1] == END_TOKEN
        if ended.any():
            for row in ended.nonzero(as_tuple=True)[0].tolist():
                results[int(alive[row])] = (seqs[row, 1:-1].tolist(), True)
            keep = (~ended).nonzero(as_tuple=True)[0]
            alive, seqs = alive[keep], seqs[keep]
            if not len(alive):
                break
            memory, cache = memory.index_select(keep), cache.index_select(keep)
    for row, index in enumerate(alive.tolist()):
        results[index] = (seqs[row, 1:].tolist(), False)
    return results


def _beam(decoder, memory, batch: int, beam_size: int, max_len: int, min_len: int, length_penalty: float,
          no_repeat_ngram: int, device) -> List[Tuple[List[int], bool]]:
    """Beam search with Hugging Face's rules (2K candidates per step, a hypothesis ends at the end token with score
    sum(log p) / length ** length_penalty, stop when K are done and no running beam can beat them), batched with
    beams as the batch dimension; images whose search is over leave the batch."""
    K = beam_size
    finished: List[List[Tuple[float, List[int], bool]]] = [[] for _ in range(batch)]
    alive = torch.arange(batch, device=device)  # original index of each running image
    memory = memory.repeat_interleave(K)
    seqs = torch.full((batch * K, 1), END_TOKEN, dtype=torch.long, device=device)  # (A * K, 1 + steps)
    scores = torch.zeros(batch, K, device=device)  # (A, K) running sum of log-probs
    scores[:, 1:] = -1e9  # all beams start equal: only the first may expand
    cache = decoder.new_cache()
    for step in range(max_len):
        A = len(alive)
        logp = _step_log_probs(decoder, seqs[:, -1:], memory, cache, seqs, no_repeat_ngram,
                               step >= min_len)  # (A * K, V)
        vocab = logp.shape[-1]
        candidates = (logp + scores.view(-1, 1)).view(A, K * vocab)
        top_scores, top_index = candidates.topk(2 * K, dim=1)  # (A, 2K), best first
        beam = torch.div(top_index, vocab, rounding_mode="floor")  # (A, 2K); `//` warns on torch 1.12
        source = beam + torch.arange(A, device=device).unsqueeze(1) * K  # (A, 2K) rows of seqs
        token = top_index % vocab
        ends = token == END_TOKEN
        last = step == max_len - 1
        length = step + 1  # generated tokens, the end token included
        # Only the first K candidates may finish (the rest exist so that K beams can keep running).
        done_a, done_c = (torch.ones_like(ends) if last else ends)[:, :K].nonzero(as_tuple=True)
        for a, c in zip(done_a.tolist(), done_c.tolist()):
            hyps = finished[alive[a]]
            ended = bool(ends[a, c])
            ids = seqs[source[a, c], 1:].tolist() + ([] if ended else [int(token[a, c])])
            hyps.append((float(top_scores[a, c]) / length ** length_penalty, ids, ended))
            hyps.sort(key=lambda h: -h[0])
            del hyps[K:]
        if last:
            break
        running = (top_scores - ends.float() * 1e9).topk(K, dim=1).indices  # (A, K): the best K that did not end
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
    return [(hyps[0][1], hyps[0][2]) for hyps in finished]


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


@torch.no_grad()
def generate(decoder, image_tokens: torch.Tensor, method: str = DECODE_DEFAULTS["method"],
             beam_size: int = DECODE_DEFAULTS["beam_size"], max_len: int = DECODE_DEFAULTS["max_len"],
             min_len: int = DECODE_DEFAULTS["min_len"], length_penalty: float = DECODE_DEFAULTS["length_penalty"],
             no_repeat_ngram: int = DECODE_DEFAULTS["no_repeat_ngram"], return_attention: bool = False):
    """Captions as token ids (end token stripped) for a batch of image tokens (B, N, encoder_dim); the end token is
    banned until min_len tokens were generated (1: never an empty caption).

    Image keys/values are computed once per image (decoder.image_memory); each step feeds only the new token through
    the KV cache. return_attention=True also returns, per image, a list over decoder blocks (None where a block has
    no cross-attention) of (n_head, L, N) probabilities: row j is the step that produced token j, and a last row the
    step that produced the end token when the caption ended."""
    if method not in ("beam", "greedy"):
        raise ValueError("method must be 'beam' or 'greedy', got %r" % method)
    if beam_size < 1 or max_len < 1 or min_len < 0:
        raise ValueError("beam_size and max_len must be >= 1 and min_len >= 0, got %d, %d and %d"
                         % (beam_size, max_len, min_len))
    max_len = min(max_len, decoder.max_text_len - 1)  # the start token takes a position too
    was_training = decoder.training
    decoder.eval()
    try:
        memory = decoder.image_memory(image_tokens)
        batch, device = image_tokens.shape[0], image_tokens.device
        if method == "greedy":
            results = _greedy(decoder, memory, batch, max_len, min_len, no_repeat_ngram, device)
        else:
            results = _beam(decoder, memory, batch, beam_size, max_len, min_len, length_penalty, no_repeat_ngram,
                            device)
        ids = [seq for seq, _ in results]
        if not return_attention:
            return ids
        return ids, _replay_attention(decoder, image_tokens, results)
    finally:
        decoder.train(was_training)
