"""Caption search on the decoder's KV cache: greedy, sampling and beam search, batched, with the n-gram ban and the
minimum length, as a DecodingSettings (decoding.py) says; and the replay that gives the cross-attention behind each
generated token (P3).

Image keys/values are computed once per image (decoder.image_memory); each step feeds only the new token through the
KV cache; beams and sampled captions are batch rows, and rows whose search is over leave the batch.

Sampling is reproducible whatever the batch: each caption draws from its own stream of uniforms, seeded by SHA-256 of
(seed, image key, draw number), and takes at step t the token where the cumulative distribution passes its t-th
uniform. The image key is the prediction key (p2_inference) or, by default, the image's place in the call.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from hw3.data.tokenizer import END_TOKEN, BPETokenizer, shared_tokenizer
from hw3.models.decoding import DEFAULT_DECODING, DecodingSettings

def decode_captions(ids: List[List[int]], tokenizer: Optional[BPETokenizer] = None) -> List[str]:
    """Token ids (end token stripped, as generate returns them) -> caption texts."""
    tokenizer = tokenizer or shared_tokenizer()
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


def _sample(decoder, memory, rows: int, settings: DecodingSettings, device,
            uniforms: Optional[torch.Tensor] = None) -> List[Tuple[List[int], bool]]:
    """One caption per row, token by token: the argmax (greedy) or, with `uniforms` (rows, max_len), a draw per
    step (sample_next_word with the settings' temperature, top_k and top_p). Finished captions leave the batch, so
    later steps only compute the ones still running."""
    results: List[Optional[Tuple[List[int], bool]]] = [None] * rows
    alive = torch.arange(rows, device=device)  # original index of each running row
    end = decoder.vocab.end_index
    seqs = torch.full((rows, 1), end, dtype=torch.long, device=device)  # (R, 1 + steps) output indices
    cache = decoder.new_cache()
    for step in range(settings.max_len):
        logp = _step_log_probs(decoder, seqs, memory, cache, settings.no_repeat_ngram, end, step >= settings.min_len)
        uniform = None if uniforms is None else uniforms[alive.cpu(), step]
        word = sample_next_word(logp, uniform, settings.temperature, settings.top_k, settings.top_p)
        seqs = torch.cat([seqs, word.unsqueeze(1)], dim=1)
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


def _beam(decoder, memory, batch: int, settings: DecodingSettings, device) -> List[Tuple[List[int], bool]]:
    """Beam search with Hugging Face's rules (2K candidates per step, a hypothesis ends at the end token with score
    sum(log p) / length ** length_penalty, stop when K are done and no running beam can beat them), batched with
    beams as the batch dimension; images whose search is over leave the batch. Returns the best captions_per_image
    finished hypotheses of each image, best first (Hugging Face's num_return_sequences)."""
    K, max_len, length_penalty = settings.beam_size, settings.max_len, settings.length_penalty
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
        logp = _step_log_probs(decoder, seqs, memory, cache, settings.no_repeat_ngram, end,
                               step >= settings.min_len)  # (A * K, V)
        # Each beam's best 2K tokens, then the best 2K of those K * 2K: the 2K best of all K * V candidates (a beam
        # adds one score to all its tokens), without adding the scores to, and ranking, the whole vocabulary.
        per_beam, per_token = logp.topk(min(2 * K, logp.shape[-1]), dim=1)  # (A * K, W), best first
        width = per_beam.shape[1]
        candidates = (per_beam + scores.view(-1, 1)).view(A, K * width)
        top_scores, top_index = candidates.topk(2 * K, dim=1)  # (A, 2K), best first
        beam = torch.div(top_index, width, rounding_mode="floor")  # (A, 2K); `//` warns on torch 1.12
        source = beam + torch.arange(A, device=device).unsqueeze(1) * K  # (A, 2K) rows of seqs
        token = per_token.view(A, K * width).gather(1, top_index)
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
    return [(ids, ended) for hyps in finished for _, ids, ended in hyps[:settings.captions_per_image]]


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
def generate(decoder, image_tokens: torch.Tensor, settings: DecodingSettings = DEFAULT_DECODING,
             image_keys: Optional[Sequence[str]] = None, return_attention: bool = False, return_ended: bool = False):
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
    batch, device, count = image_tokens.shape[0], image_tokens.device, settings.captions_per_image
    keys = [str(i) for i in range(batch)] if image_keys is None else [str(k) for k in image_keys]
    if len(keys) != batch:
        raise ValueError("%d image keys for %d images" % (len(keys), batch))
    max_len = effective_max_len(decoder, settings.max_len)  # a min_len beyond it bans the end token throughout
    settings = settings.replace(max_len=max_len, min_len=min(settings.min_len, max_len))
    was_training = decoder.training
    decoder.eval()
    try:
        memory = decoder.image_memory(image_tokens)
        if settings.method == "beam":
            results = _beam(decoder, memory, batch, settings, device)
        elif settings.method == "greedy":
            results = _sample(decoder, memory, batch, settings, device)
        else:
            if count > 1:
                memory = memory.repeat_interleave(count)
            results = _sample(decoder, memory, batch * count, settings, device,
                              draw_uniforms(settings.seed, keys, count, settings.max_len))
        outputs = [[seq for seq, _ in results]]
        if return_attention:
            if count > 1:
                image_tokens = image_tokens.repeat_interleave(count, dim=0)
            outputs.append(_replay_attention(decoder, image_tokens, results))
        if return_ended:
            outputs.append([ended for _, ended in results])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
    finally:
        decoder.train(was_training)
