"""The captioning model in one place: a frozen pretrained ViT, the GPT-2 decoder, the caption generator, checkpoints.

Training, inference, evaluation during training and P3 all build the model, decode captions and read/write
checkpoints through this module, so a checkpoint always rebuilds exactly the model that was trained.

Encoder specs (one string, saved in the checkpoint's JSON):
    timm:NAME[.TAG][@WEIGHTS][?key=value&...]      timm ViT; WEIGHTS = none (seeded random init) or a local file,
                                                   absent = the tag's hub weights; key=value go to timm.create_model
    open_clip:MODEL[@PRETRAINED]                   open_clip visual tower; MODEL = name or model-config JSON path,
                                                   PRETRAINED = tag, local file or none
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import safe_load
from common import UserError, atomic_write, hub_offline, write_json

END_TOKEN = 50256
# CLIP ViT-H/14 trained on DFN-5B: the strongest CLIP image tower timm 0.9.10 knows below ViT-bigG (83.4% ImageNet
# zero-shot vs 78.0% for LAION-2B ViT-H/14); 1280 wide, 16x16 patches + CLS at 224 px; a 3.9 GB download.
DEFAULT_ENCODER = "timm:vit_huge_patch14_clip_quickgelu_224.dfn5b"
DOWNLOAD_HINT = ("run `bash hw3_download.sh` (online) first, or point the encoder at a local weight file "
                 "(p2_inference.py --encoder timm:NAME@/path/to/weights)")
TIMM_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # what timm's load_state_dict unwraps
RANDOM_INIT_SEED = 0  # `@none` encoders are seeded, so a saved spec rebuilds the same random weights
CHECKPOINT_FORMAT = "hw3-captioner/1"
T = TypeVar("T")
# The decoding the README documents for hw3_2.sh; a checkpoint may recommend others (INFERENCE_KEY, below).
DECODE_DEFAULTS = dict(method="beam", beam_size=3, max_len=30, length_penalty=1.0, no_repeat_ngram=3)
# A checkpoint JSON's recommended inference decoding: {"method": ..., ..., "chosen_on": "what validation data and
# measure picked them"}. Only settings tuned for inference on validation data belong here; training's validation
# decoding is recorded elsewhere ("validation_decoding") and never used by inference.
INFERENCE_KEY = "inference"
BEAM_ONLY = ("beam_size", "length_penalty")  # flags that mean beam search: giving one alone asks for it


# ----------------------------------------------------------------------------------------------- encoder specs

def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_encoder_spec(spec: str) -> Tuple[str, str, Optional[str], Dict[str, object]]:
    """'timm:vit_x@none?img_size=32' -> ('timm', 'vit_x', 'none', {'img_size': 32})."""
    backend, sep, rest = spec.partition(":")
    if not sep or backend not in ("timm", "open_clip") or not rest:
        raise UserError("encoder spec %r must look like timm:NAME[.TAG][@WEIGHTS][?key=value] or "
                        "open_clip:MODEL[@PRETRAINED]" % spec)
    rest, _, query = rest.partition("?")
    kwargs = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError("encoder spec %r: option %r is not key=value" % (spec, item))
        kwargs[key] = _parse_value(value)
    name, at, weights = rest.rpartition("@")
    if not at:
        name, weights = rest, None
    if backend == "open_clip" and kwargs:
        raise UserError("encoder spec %r: open_clip encoders take no ?options" % spec)
    return backend, name, weights or None, kwargs


def _seeded(build: Callable[[], T]) -> T:
    """Runs build() under the fixed seed of random-weight encoders, leaving the caller's random state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build()


def _hub_file_cached(repo: str, filenames: Sequence[str]) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo.partition("@")
    for filename in filenames:
        path = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _timm_pretrained_cfg(name: str) -> Optional[dict]:
    """timm's download recipe for NAME[.TAG] (hub id, file name, url), or None if it has no pretrained weights."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag of a known architecture
        return None
    cfg = cfg.to_dict() if cfg is not None else {}
    return cfg if cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") else None


def timm_weights_cached(name: str) -> Optional[str]:
    """The local file timm would load for `name` (NAME.TAG), or None when it still has to be downloaded."""
    cfg = _timm_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    repo = cfg.get("hf_hub_id")
    if repo:
        filename = cfg.get("hf_hub_filename") or "pytorch_model.bin"
        stem = os.path.splitext(filename)[0]
        alternatives = ["model.safetensors"] if filename == "pytorch_model.bin" else [
            stem.replace("pytorch_model", "model") + ".safetensors", stem + ".safetensors"]
        path = _hub_file_cached(repo, alternatives + [filename])
        if path:
            return path
    if cfg.get("url"):
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg["url"]))
        return path if os.path.isfile(path) else None
    return None


def check_encoder_weights(spec: str, offline: Optional[bool] = None) -> None:
    """Raises at once, before any model is built, if the encoder's weights cannot be had (unknown name or tag,
    missing local file, not downloaded while offline)."""
    backend, name, weights, _ = parse_encoder_spec(spec)
    offline = hub_offline() if offline is None else offline
    if weights is not None and weights.lower() != "none" and not os.path.isfile(weights) and (
            backend == "timm" or os.path.sep in weights):
        raise UserError("encoder weight file not found: %s" % weights)
    if backend != "timm":
        return  # clip_utils.load_clip checks open_clip tags and downloads before building
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise UserError("unknown timm model %r in the encoder spec %s" % (name, spec))
    if weights is not None:
        return
    if _timm_pretrained_cfg(name) is None:
        raise UserError("timm has no pretrained weights for %r (tags: %s)" % (
            name, ", ".join(timm.list_pretrained(name.split(".")[0] + ".*")[:8]) or "none"))
    if offline and timm_weights_cached(name) is None:
        raise UserError("encoder weights %s are not downloaded and this machine is offline: %s" % (name, DOWNLOAD_HINT))


def _build_timm(name: str, weights: Optional[str], kwargs: Dict[str, object]) -> nn.Module:
    import timm

    kwargs = dict(kwargs, num_classes=0)
    if weights is not None and weights.lower() == "none":
        return _seeded(lambda: timm.create_model(name, pretrained=False, **kwargs))
    try:
        if weights is not None:
            return _timm_from_file(name, weights, kwargs)
        with safe_load.restricted_torch_load("encoder weights"):  # timm's hub loader calls torch.load itself
            return timm.create_model(name, pretrained=True, **kwargs)
    except UserError:
        raise
    except Exception as err:  # hub, unpickling and shape errors alike: say which encoder and why, on one line
        raise UserError("cannot load encoder %s%s: %s" % (name, " from " + weights if weights else "",
                                                          " ".join(str(err).split())[:300])) from None


def _timm_from_file(name: str, weights: str, kwargs: Dict[str, object]) -> nn.Module:
    """A timm model from a local weight file (timm's own layout, or any layout its checkpoint filter converts, e.g. an
    open_clip CLIP), strict about coverage: timm's pretrained loader turns strictness off when the classifier is
    dropped, so a file missing whole blocks would otherwise load silently with those blocks left random."""
    import sys

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


class ImageEncoder(nn.Module):
    """A frozen ViT returning ALL its output tokens (B, N, width): prefix tokens (CLS/registers) then the patch grid."""

    def __init__(self, spec: str = DEFAULT_ENCODER, offline: Optional[bool] = None):
        super().__init__()
        self.spec = spec
        backend, name, weights, kwargs = parse_encoder_spec(spec)
        offline = hub_offline() if offline is None else offline
        check_encoder_weights(spec, offline)
        self.backend = backend
        if backend == "timm":
            self._init_timm(name, weights, kwargs)
        else:
            self._init_open_clip(name, weights, offline)
        for p in self.parameters():
            p.requires_grad = False
        self.eval()

    def _init_timm(self, name, weights, kwargs) -> None:
        from timm.data import create_transform, resolve_data_config

        self.model = _build_timm(name, weights, kwargs)
        if not hasattr(self.model, "patch_embed") or not hasattr(self.model, "num_prefix_tokens"):
            raise UserError("encoder %s is not a ViT with patch tokens (timm VisionTransformer expected)" % name)
        self.width = int(self.model.num_features)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        self.grid_size = tuple(int(g) for g in self.model.patch_embed.grid_size)
        data_config = resolve_data_config({}, model=self.model)
        data_config["input_size"] = (3,) + tuple(int(s) for s in self.model.patch_embed.img_size)
        self.transform = create_transform(**data_config, is_training=False)

    def _init_open_clip(self, name, weights, offline) -> None:
        import clip_utils

        hub_offline(offline)
        if weights == "none":  # seeded like timm's @none, so a saved spec rebuilds the same random tower
            clip, self.transform, _ = _seeded(lambda: clip_utils.load_clip(name, None))
        else:
            clip, self.transform, _ = clip_utils.load_clip(name, weights)
        visual = clip.visual
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "transformer"):
            raise UserError("open_clip encoder %s: only plain ViT visual towers (no attention pooling, no timm trunk) "
                            "are supported; use the timm: spec for timm towers" % name)
        self.model = visual
        self.width = int(visual.transformer.width)
        self.num_prefix_tokens = 1
        self.grid_size = tuple(int(g) for g in visual.grid_size)

    def train(self, mode: bool = True) -> "ImageEncoder":
        return super().train(False)  # frozen: dropout/drop-path stay off whatever the caller trains

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised by `transform` -> tokens (B, num_prefix_tokens + h * w, width)."""
        if self.backend == "timm":
            tokens = self.model.forward_features(images)
        else:
            tokens = self._open_clip_tokens(images)
        assert tokens.dim() == 3 and tokens.shape[-1] == self.width, tuple(tokens.shape)
        return tokens

    def _open_clip_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm: the transformer's output caught by a hook, then ln_post on every token
        (open_clip's own `output_tokens` drops the CLS token)."""
        visual = self.model
        caught = []
        handle = visual.transformer.register_forward_hook(lambda module, args, out: caught.append(out))
        try:
            visual(images)
        finally:
            handle.remove()
        x = caught[0]
        if not getattr(visual.transformer, "batch_first", True):
            x = x.permute(1, 0, 2)  # older open_clip runs the transformer as (N, B, width)
        return visual.ln_post(x)


def download_encoder(spec: str = DEFAULT_ENCODER) -> None:
    """Online: builds the encoder once so that its weights land in the hub cache that offline inference reads."""
    ImageEncoder(spec, offline=False)


# ----------------------------------------------------------------------------------------------- the model

class Captioner(nn.Module):
    """Frozen image encoder + trainable decoder parts; only the decoder's trainable tensors are ever saved."""

    def __init__(self, encoder: ImageEncoder, decoder: nn.Module):
        super().__init__()
        if decoder.cfg.encoder_dim != encoder.width:
            raise UserError("decoder expects %d-wide image tokens but encoder %s gives %d" % (
                decoder.cfg.encoder_dim, encoder.spec, encoder.width))
        self.encoder = encoder
        self.decoder = decoder

    def train(self, mode: bool = True) -> "Captioner":
        super().train(mode)
        self.encoder.train(False)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def _image_tokens(self, visual: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) are encoded; image tokens (B, N, width), e.g. from a feature cache, pass through."""
        return self.encode(visual) if visual.dim() == 4 else visual

    def forward(self, visual: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(images or image tokens, tokens (B, T)) -> logits (B, T, vocab)."""
        return self.decoder(tokens, image_tokens=self._image_tokens(visual))

    def generate(self, visual: torch.Tensor, **settings):
        return generate(self.decoder, self._image_tokens(visual), **settings)

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return self.decoder.trainable_state_dict()


def build_captioner(encoder_spec: str, decoder_config, offline: Optional[bool] = None) -> Captioner:
    """A fresh captioner; the decoder config's encoder_dim is set from the encoder."""
    import dataclasses

    from decoder import Decoder, DecoderWeightsError

    encoder = ImageEncoder(encoder_spec, offline=offline)
    cfg = dataclasses.replace(decoder_config, encoder_dim=encoder.width)
    try:
        decoder = Decoder(cfg)
    except (DecoderWeightsError, ValueError) as err:
        raise UserError(str(err)) from None
    return Captioner(encoder, decoder)


def decode_captions(ids: List[List[int]], tokenizer=None) -> List[str]:
    if tokenizer is None:
        from tokenizer import BPETokenizer

        tokenizer = BPETokenizer()
    return [tokenizer.decode(seq).strip() for seq in ids]


# ----------------------------------------------------------------------------------------------- generation

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


def _step_log_probs(decoder, tokens, memory, cache, seqs, no_repeat_ngram) -> torch.Tensor:
    logits = decoder(tokens, memory=memory, cache=cache)[:, -1]  # (R, V)
    return _ban_repeated_ngrams(F.log_softmax(logits.float(), dim=-1), seqs, no_repeat_ngram)


def _greedy(decoder, memory, batch: int, max_len: int, no_repeat_ngram: int, device) -> List[Tuple[List[int], bool]]:
    """Argmax decoding; finished captions leave the batch, so later steps only compute the ones still running."""
    results: List[Optional[Tuple[List[int], bool]]] = [None] * batch
    alive = torch.arange(batch, device=device)  # original index of each running row
    seqs = torch.full((batch, 1), END_TOKEN, dtype=torch.long, device=device)  # (R, 1 + steps)
    cache = decoder.new_cache()
    for _ in range(max_len):
        logp = _step_log_probs(decoder, seqs[:, -1:], memory, cache, seqs, no_repeat_ngram)
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


def _beam(decoder, memory, batch: int, beam_size: int, max_len: int, length_penalty: float,
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
        logp = _step_log_probs(decoder, seqs[:, -1:], memory, cache, seqs, no_repeat_ngram)  # (A * K, V)
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
             length_penalty: float = DECODE_DEFAULTS["length_penalty"],
             no_repeat_ngram: int = DECODE_DEFAULTS["no_repeat_ngram"], return_attention: bool = False):
    """Captions as token ids (end token stripped) for a batch of image tokens (B, N, encoder_dim).

    Image keys/values are computed once per image (decoder.image_memory); each step feeds only the new token through
    the KV cache. return_attention=True also returns, per image, a list over decoder blocks (None where a block has
    no cross-attention) of (n_head, L, N) probabilities: row j is the step that produced token j, and a last row the
    step that produced the end token when the caption ended."""
    if method not in ("beam", "greedy"):
        raise ValueError("method must be 'beam' or 'greedy', got %r" % method)
    if beam_size < 1 or max_len < 1:
        raise ValueError("beam_size and max_len must be >= 1, got %d and %d" % (beam_size, max_len))
    max_len = min(max_len, decoder.cfg.block_size - 1 - decoder.cfg.prompt_len)
    was_training = decoder.training
    decoder.eval()
    try:
        memory = decoder.image_memory(image_tokens)
        batch, device = image_tokens.shape[0], image_tokens.device
        if method == "greedy":
            results = _greedy(decoder, memory, batch, max_len, no_repeat_ngram, device)
        else:
            results = _beam(decoder, memory, batch, beam_size, max_len, length_penalty, no_repeat_ngram, device)
        ids = [seq for seq, _ in results]
        if not return_attention:
            return ids
        return ids, _replay_attention(decoder, image_tokens, results)
    finally:
        decoder.train(was_training)


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
    for key, least in (("beam_size", 1), ("max_len", 1), ("no_repeat_ngram", 0)):
        if out[key] < least:
            raise UserError("%s: %s must be >= %d, got %s" % (where, key.replace("_", "-"), least, out[key]))
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
    group.add_argument("--length-penalty", type=float,
                       help="beam score = sum(log p) / length ** this (> 0 favours longer captions)")
    group.add_argument("--no-repeat-ngram", type=int, help="forbid repeating n-grams of this size (0 = off)")


def resolve_decoding(given: Dict[str, object], meta: Optional[dict] = None,
                     checkpoint: str = "checkpoint") -> Tuple[Dict[str, object], str]:
    """The decoding settings to use and a line saying where each came from. Each given (non-None) flag takes effect
    on its own, over the checkpoint's recommended inference settings (meta[INFERENCE_KEY]), over DECODE_DEFAULTS; a
    beam-only flag (--beam-size, --length-penalty) given without --method means beam search."""
    saved = (meta or {}).get(INFERENCE_KEY)
    where = "%s (%r)" % (config_path(checkpoint), INFERENCE_KEY)
    if saved is not None and not (isinstance(saved, dict) and set(DECODE_DEFAULTS) <= set(saved)
                                  and isinstance(saved.get("chosen_on"), str)):
        raise UserError("%s must hold %s and 'chosen_on' (the validation data that chose them)"
                        % (where, ", ".join(DECODE_DEFAULTS)))
    base = _checked_settings(saved, where) if saved else dict(DECODE_DEFAULTS)
    flags = {k: v for k, v in given.items() if k in DECODE_DEFAULTS and v is not None}
    if flags.get("method") == "greedy" and (flags.get("beam_size", 1) > 1 or "length_penalty" in flags):
        raise UserError("--method greedy contradicts %s, which only beam search uses" % " and ".join(
            "--" + k.replace("_", "-") for k in BEAM_ONLY if k in flags and (k != "beam_size" or flags[k] > 1)))
    if "method" not in flags and any(k in flags for k in BEAM_ONLY) and flags.get("beam_size", 2) > 1:
        flags["method"] = "beam"
    settings = _checked_settings(dict(base, **flags), "decoding option")
    origin = "checkpoint %s (chosen on %s)" % (os.path.basename(config_path(checkpoint)), saved["chosen_on"]) \
        if saved else "the README defaults"
    said = ", ".join("%s=%s" % kv for kv in settings.items())
    source = "from the command line: %s; the rest from %s" % (", ".join(sorted(flags)), origin) if flags \
        else "all from %s" % origin
    return settings, "decoding: %s (%s)" % (said, source)


# ----------------------------------------------------------------------------------------------- checkpoints

def config_path(checkpoint: str) -> str:
    """checkpoints/p2_best.pt -> checkpoints/p2_best.json: the model configuration saved beside the tensors."""
    return os.path.splitext(checkpoint)[0] + ".json"


def save_checkpoint(path: str, captioner: Captioner, extra: Optional[dict] = None) -> None:
    """Writes only the trainable tensors (a flat dict: the course counts parameters from this file) and, beside it,
    the JSON that rebuilds the model. `extra` (epoch, scores, recommended decoding under INFERENCE_KEY...) goes in
    the JSON too."""
    state = {k: v.detach().cpu().contiguous() for k, v in captioner.trainable_state_dict().items()}
    decoder_config = captioner.decoder.cfg.to_dict()
    decoder_config.pop("checkpoint", None)  # the decoder weights are an inference argument, not part of the model
    meta = dict(format=CHECKPOINT_FORMAT, encoder=captioner.encoder.spec, decoder=decoder_config,
                trainable_parameters=sum(v.numel() for v in state.values()),
                tensors={k: list(v.shape) for k, v in state.items()})
    meta.update(extra or {})
    with atomic_write(path, "wb") as f:
        torch.save(state, f)
    write_json(config_path(path), meta)


def read_checkpoint_config(checkpoint: str) -> dict:
    from common import read_json

    if not os.path.isfile(checkpoint):
        raise UserError("checkpoint not found: %s (run `bash hw3_download.sh`, or pass --checkpoint)" % checkpoint)
    path = config_path(checkpoint)
    meta = read_json(path, "checkpoint config (saved beside %s)" % os.path.basename(checkpoint))
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or not isinstance(
            meta.get("decoder"), dict) or not isinstance(meta.get("encoder"), str):
        raise UserError("%s is not a captioner config (expected format %r with 'encoder' and 'decoder')" % (
            path, CHECKPOINT_FORMAT))
    return meta


def _check_tensors(checkpoint: str, state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = ["%s %s (config gives %s)" % (k, tuple(state[k].shape), tuple(expected[k].shape))
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if names:
            problems.append("%d %s: %s%s" % (len(names), what, ", ".join(names[:3]), " ..." if len(names) > 3 else ""))
    if problems:
        raise UserError("checkpoint %s does not match its config %s: %s" % (
            checkpoint, config_path(checkpoint), "; ".join(problems)))


def repo_relative(spec: str) -> str:
    """A saved spec's relative file paths (config, weights) that don't exist from the working folder are read from
    the repository's root instead, so committed checkpoints load from anywhere."""
    root = os.path.dirname(os.path.abspath(__file__))
    backend, sep, rest = spec.partition(":")
    parts = []
    for part in rest.split("@"):
        path, query_sep, query = part.partition("?")
        if path and not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(root, path)):
            path = os.path.join(root, path)
        parts.append(path + query_sep + query)
    return backend + sep + "@".join(parts)


def load_captioner(checkpoint: str, decoder_weights: str, device="cpu", offline: Optional[bool] = None,
                   encoder_spec: Optional[str] = None) -> Tuple[Captioner, dict]:
    """Rebuilds the trained captioner: encoder from the saved spec (or `encoder_spec`, e.g. a local weight file),
    frozen GPT-2 from `decoder_weights`, trained tensors from `checkpoint`. Returns (captioner in eval mode, config)."""
    from decoder import Config, Decoder, DecoderWeightsError

    meta = read_checkpoint_config(checkpoint)
    state = safe_load.load_tensors(checkpoint, "checkpoint")
    encoder_spec = encoder_spec or repo_relative(meta["encoder"])
    check_encoder_weights(encoder_spec, offline)  # fail before the slow builds
    try:
        cfg = Config.from_dict(dict(meta["decoder"], checkpoint=decoder_weights))
    except (TypeError, ValueError) as err:
        raise UserError("%s: bad decoder config: %s" % (config_path(checkpoint), err)) from None
    try:
        decoder = Decoder(cfg)
    except DecoderWeightsError as err:
        raise UserError("decoder weights %s: %s" % (decoder_weights, err)) from None
    except ValueError as err:
        raise UserError("%s: bad decoder config: %s" % (config_path(checkpoint), err)) from None
    _check_tensors(checkpoint, state, {k: v for k, v in decoder.named_parameters() if v.requires_grad})
    decoder.load_trainable_state_dict(state)
    encoder = ImageEncoder(encoder_spec, offline=offline)
    captioner = Captioner(encoder, decoder).to(device).eval()
    return captioner, meta


__all__ = ["DEFAULT_ENCODER", "DECODE_DEFAULTS", "INFERENCE_KEY", "END_TOKEN", "Captioner", "ImageEncoder",
           "add_decoding_arguments", "build_captioner", "check_encoder_weights", "resolve_decoding", "config_path", "decode_captions", "download_encoder", "generate", "hub_offline",
           "load_captioner", "parse_encoder_spec", "read_checkpoint_config", "save_checkpoint", "timm_weights_cached"]
