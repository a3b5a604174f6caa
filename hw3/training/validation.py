"""Validation after an epoch: captions through the one search, the teacher-forced loss, the --val-metrics scored
as p2_evaluate scores them, and best.pt kept by --select-on."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

from hw3.data import datasets
from hw3.data.images import image_batches
from hw3.evaluation import metrics
from hw3.models import clip_backend
from hw3.models.captioner import save_checkpoint
from hw3.models.decoding import DATA_LENGTH_KEY, DecodingSettings
from hw3.models.search import decode_captions
from hw3.util.device import autocast
from hw3.util.errors import UserError, progress
from hw3.util.files import write_json
from hw3.util.resources import HalvingBatches
from hw3.training.config import TrainingConfig, validation_metric_names
from hw3.training.data import TrainingData, trained_caption_tokens
from hw3.training.loop import caption_loss
from hw3.training.state import TrainingState, log_line

# What may pick best.pt (+1: higher is better): every validation metric's field, "mean" (of metrics.MEAN_OF, as
# the course project report by Zhao, Wang and Zhang picks), and the validation loss.
SELECT_METRICS = dict([(k.lower(), 1) for k in metrics.result_keys(metrics.METRIC_KEYS)], mean=1, val_loss=-1)
SCST_OPTIONS = ("scst_epochs", "scst_samples", "scst_baseline", "scst_lr", "scst_temperature", "scst_clip_weight",
                "scst_end_word", "init_from")  # recorded in the checkpoint JSON of a self-critical run


@torch.no_grad()
def validate(state: TrainingState, val_loader, val, val_tokens) -> dict:
    """Validation captions through captioner's generate, teacher-forced loss on every reference caption."""
    captioner, decoder, device, amp = state.captioner, state.decoder, state.world.device, state.amp
    v = state.config.validation
    captioner.eval()
    predictions, loss_sum, count = {}, 0.0, 0
    keys = val.keys()
    pieces = HalvingBatches("validation")  # a CUDA out-of-memory error halves the batch

    def one_batch(index, visuals) -> Tuple[List[List[int]], float, int]:
        with autocast(device, amp):
            tokens = captioner.image_tokens(visuals.to(device))  # (B, N, width)
            ids = captioner.generate(tokens, DecodingSettings(method=v.val_decode, beam_size=v.val_beam_size,
                                                              max_len=v.val_max_len))
            rows = [(r, caption) for r, i in enumerate(index) for caption in val_tokens[i]]
            inputs, targets = datasets.caption_targets([c for _, c in rows])
            repeat = torch.tensor([r for r, _ in rows], device=device)
            targets = targets.to(device)
            positions = targets != datasets.IGNORE_INDEX
            logits = decoder(inputs.to(device), image_tokens=tokens.index_select(0, repeat), positions=positions)
            targets = decoder.vocab.targets(targets)[positions]  # (M,); a compact layer's unknown ids are ignored
        n = int((targets != datasets.IGNORE_INDEX).sum())
        return ids, float(caption_loss(logits, targets)) * n, n

    for index, visuals in image_batches(progress(val_loader, desc="validation", leave=False)):
        ids = []
        for piece_ids, loss, n in pieces(len(index), lambda s, e: one_batch(index[s:e], visuals[s:e])):
            ids += piece_ids
            loss_sum += loss
            count += n
        for i, caption in zip(index, decode_captions(ids)):
            predictions[keys[i]] = caption
    return dict(predictions=predictions, val_loss=loss_sum / max(1, count))


def score(predictions: dict, val, names, clip, device) -> Dict[str, Optional[float]]:
    """The --val-metrics of the validation captions against the references as written, through metrics (as
    p2_evaluate scores), as {field: score} (a skipped metric is None), plus "mean" when its four are there."""
    keys = val.keys()
    result = metrics.score_captions(predictions, dict(zip(keys, val.references)),
                                    metrics.Scoring(names, clip=clip, device=str(device)),
                                    paths={k: val.path(i) for i, k in enumerate(keys)})
    out = {k.lower(): (float(result[k]) if k in result else None) for k in metrics.result_keys(names)}
    if all(out.get(k.lower()) is not None for k in metrics.MEAN_OF):
        out["mean"] = sum(out[k.lower()] for k in metrics.MEAN_OF) / len(metrics.MEAN_OF)
    return out


def load_clip(config: TrainingConfig, device):
    """The CLIP triple for CLIPScore, loaded once before any training (None when no CLIP metric is asked)."""
    v = config.validation
    if not any(m in metrics.CLIP_METRICS for m in validation_metric_names(config)) \
            and not config.scst.scst_clip_weight > 0:
        return None
    try:
        return clip_backend.load_clip(v.clip_model, v.clip_pretrained, str(device))
    except UserError as err:
        raise UserError("CLIPScore: %s (here: --clip-pretrained PATH, or --no-clipscore to validate with CIDEr only)"
                        % err) from None


class Keeper:
    """Validation after an epoch, and best.pt kept by --select-on across the cross-entropy and self-critical
    epochs."""

    def __init__(self, state: TrainingState, data: TrainingData, val, clip, schedule: dict):
        self.state, self.data, self.val, self.clip, self.schedule = state, data, val, clip, schedule

    def validate_and_keep(self, epoch: int, record: dict, best: Optional[dict]) -> Optional[dict]:
        """Validation captions and scores after `epoch` (0: the --init-from model), logged; best.pt rewritten when
        they beat `best`. Returns the best so far."""
        state, config = self.state, self.state.config
        select, out = config.validation.select, config.run.out
        result = validate(state, self.data.val_loader, self.val, self.data.val_tokens)
        write_json(os.path.join(out, "val_predictions.json"), result["predictions"])
        record.update(score(result["predictions"], self.val, validation_metric_names(config), self.clip,
                            state.world.device), val_loss=result["val_loss"])
        value = record.get(select)
        if value is None:
            raise UserError("the evaluation gave no %s (it gave %s)" % (select, ", ".join(record)))
        if best is None or SELECT_METRICS[select] * (value - best["value"]) > 0:
            best = dict(metric=select, value=value, epoch=epoch)
            save_checkpoint(os.path.join(out, "best.pt"), state.captioner, extra=self._checkpoint_record(epoch, record))
        record["best_epoch"] = best["epoch"]
        log_line(state.log_path, **record)
        print(json.dumps(record), file=sys.stderr)
        return best

    def _checkpoint_record(self, epoch: int, record: dict) -> dict:
        config = self.state.config
        v = config.validation
        extra = dict(epoch=epoch, phase=record.get("phase", "cross-entropy"), metrics={
            k: record[k] for k in record if k not in ("kind", "epoch", "step", "train_seconds", "phase")},
            validation_decoding=dict(method=v.val_decode, beam_size=v.val_beam_size,
                                     max_len=v.val_max_len),  # a record, not for inference
            **self.schedule, **{DATA_LENGTH_KEY: trained_caption_tokens(config.data, self.state.captioner)})
        if config.scst.scst_epochs:
            extra["scst"] = {k: getattr(config.scst, k) for k in SCST_OPTIONS}
        return extra
