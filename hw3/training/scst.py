"""Self-critical sequence training (Rennie et al. 2017) after the cross-entropy epochs: each step is a rollout
(captions sampled through the one search), their reward (CIDEr-D against the image's training references, plus an
optional CLIPScore term) less a baseline, and a policy-gradient step."""
from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from hw3.data import datasets
from hw3.data.images import image_batches
from hw3.data.tokenizer import shared_tokenizer
from hw3.evaluation import metrics
from hw3.models.decoding import DecodingSettings
from hw3.models.search import decode_captions
from hw3.util.device import autocast
from hw3.util.errors import progress
from hw3.training.cider_reward import CiderD
from hw3.training.config import TrainingConfig
from hw3.training.state import TrainingState, log_line


def make_reward(config: TrainingConfig, train, clip, device):
    """The self-critical reward of (training image indices, captions): CIDEr-D against each image's training
    references (document frequencies of the training split, computed once), plus --scst-clip-weight x CLIPScore
    (the image embeddings computed once)."""
    keys, clip_weight = train.keys(), config.scst.scst_clip_weight
    cider = CiderD({k: refs for k, refs in zip(keys, train.references)}, end_word=config.scst.scst_end_word)
    image_embeddings = None
    if clip_weight > 0:
        model, preprocess, _ = clip
        image_embeddings = metrics.clip_image_embeddings([train.path(i) for i in range(len(keys))], model,
                                                         preprocess, device=str(device),
                                                         num_workers=config.run.workers)

    def reward(rows: List[int], captions: List[str], ended: List[bool]) -> List[float]:
        values = cider.scores([keys[i] for i in rows], captions, ended)
        if image_embeddings is not None:
            clip_scores = metrics.clip_text_scores(image_embeddings[rows], captions, clip[0], clip[2],
                                                   device=str(device))
            values = [v + clip_weight * c for v, c in zip(values, clip_scores)]
        return values
    return reward


def sample_pairs(samples: List[List[int]], max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs and targets (B, K) of sampled captions (ids without the end token): the end token is a
    target only where the caption ended, i.e. came out shorter than max_len. K stops at the last target, so a
    caption cut at the decoder's last position never feeds one more."""
    inputs, targets = datasets.caption_targets(samples)
    for row, ids in enumerate(samples):
        if len(ids) >= max_len:  # cut by max_len: it never sampled the end token
            targets[row, len(ids)] = datasets.IGNORE_INDEX
    width = max(len(ids) + (len(ids) < max_len) for ids in samples)  # the last target's column, plus one
    return inputs[:, :width], targets[:, :width]


def baseline_of(rewards: torch.Tensor) -> torch.Tensor:
    """The "new self-critical" baseline (B, K): for each sample, the mean reward of its image's other samples."""
    K = rewards.shape[1]
    return (rewards.sum(1, keepdim=True) - rewards) / (K - 1)


@dataclasses.dataclass
class Rollout:
    """One batch's sampled captions (K per image; ids without the end token) and, with the greedy baseline, its
    greedy captions; the image tokens they were sampled from."""
    index: List[int]
    tokens: torch.Tensor  # (B, N, width)
    samples: List[List[int]]
    greedy: Optional[List[List[int]]]
    max_len: int


def scst_rollout(state: TrainingState, epoch: int, index: List[int], visuals, keys: List[str]) -> Rollout:
    """K captions per image sampled through the one search (seeded per epoch and image), plus the greedy captions
    of the greedy baseline."""
    scst, device = state.config.scst, state.world.device
    max_len = min(state.config.validation.val_max_len, state.decoder.max_text_len - 1)  # as search.generate caps it
    with autocast(device, state.amp):
        tokens = state.captioner.image_tokens(visuals.to(device, non_blocking=True))  # (B, N, width)
        sampling = DecodingSettings(method="sample", temperature=scst.scst_temperature,
                                    captions_per_image=scst.scst_samples, max_len=max_len,
                                    seed=state.config.optimisation.seed)
        samples = state.captioner.generate(tokens, sampling, image_keys=["%d/%s" % (epoch, keys[i]) for i in index])
        greedy = state.captioner.generate(tokens, DecodingSettings(method="greedy", max_len=max_len)) \
            if scst.scst_baseline == "greedy" else None
    return Rollout(list(index), tokens, samples, greedy, max_len)


def scst_rewards(rollout: Rollout, reward, tokenizer) -> Tuple[torch.Tensor, torch.Tensor]:
    """The samples' rewards (B, K) and their baseline: (B, K), each image's other samples' mean, or (B, 1), its
    greedy caption's reward."""
    K = len(rollout.samples) // len(rollout.index)
    rows = [i for i in rollout.index for _ in range(K)]
    ended = [len(ids) < rollout.max_len for ids in rollout.samples]  # the rest were cut by the length limit
    rewards = torch.tensor(reward(rows, decode_captions(rollout.samples, tokenizer), ended),
                           dtype=torch.float32).view(-1, K)  # (B, K)
    if rollout.greedy is None:
        return rewards, baseline_of(rewards)
    greedy_ended = [len(ids) < rollout.max_len for ids in rollout.greedy]
    base = torch.tensor(reward(rollout.index, decode_captions(rollout.greedy, tokenizer), greedy_ended),
                        dtype=torch.float32).view(-1, 1)
    return rewards, base


def scst_policy_step(state: TrainingState, rollout: Rollout, advantage: torch.Tensor) -> torch.Tensor:
    """The policy gradient step: the sampled tokens' log-probabilities from one teacher-forced pass, weighted by
    their caption's advantage (B, K). Returns the loss."""
    device, K = state.world.device, advantage.shape[1]
    inputs, targets = sample_pairs(rollout.samples, rollout.max_len)
    targets = targets.to(device)
    positions = targets != datasets.IGNORE_INDEX
    weights = advantage.reshape(-1, 1).expand_as(targets).to(device)[positions]  # (M,)
    with autocast(device, state.amp):
        logits = state.model(rollout.tokens.repeat_interleave(K, dim=0), inputs.to(device), positions=positions)
        logp = F.log_softmax(logits.float(), dim=-1).gather(
            1, state.decoder.vocab.targets(targets)[positions].unsqueeze(1)).squeeze(1)  # (M,)
        loss = -(logp * weights).sum() / max(1, int(positions.sum()))
    state.scaler.scale(loss).backward()
    state.optimizer_step()
    return loss


def scst_epoch(state: TrainingState, epoch: int, loader, keys: List[str], reward) -> dict:
    """One self-critical pass over the training images (Rennie et al. 2017): rollout (K sampled captions per image),
    reward (`reward(image indices, captions, ended)`: CIDEr-D, plus the CLIP term) minus the baseline, policy step.
    Returns the epoch's reward figures."""
    K = state.config.scst.scst_samples
    tokenizer = shared_tokenizer()
    state.captioner.train()
    totals = dict(reward=0.0, baseline=0.0, images=0, reward_seconds=0.0, sample_seconds=0.0)
    started = time.time()
    bar = progress(loader, desc="scst %d/%d" % (epoch + 1, state.config.optimisation.epochs
                                                 + state.config.scst.scst_epochs), disable=not state.world.main)
    for index, visuals in image_batches(bar):
        t0 = time.time()
        rollout = scst_rollout(state, epoch, index, visuals, keys)
        t1 = time.time()
        rewards, base = scst_rewards(rollout, reward, tokenizer)
        t2 = time.time()
        loss = scst_policy_step(state, rollout, rewards - base)
        totals["reward"] += float(rewards.sum())
        totals["baseline"] += float(base.expand_as(rewards).sum())
        totals["images"] += len(index)
        totals["sample_seconds"] += t1 - t0
        totals["reward_seconds"] += t2 - t1
        if state.logs_now():
            bar.set_postfix(reward="%.3f" % (totals["reward"] / (totals["images"] * K)))
            log_line(state.log_path, kind="step", epoch=epoch + 1, step=state.step, loss=float(loss.detach()),
                     reward=float(rewards.mean()), lr=state.scheduler.get_last_lr()[0],
                     seconds=round(time.time() - started, 2))
    seconds = time.time() - started
    n = max(1, totals["images"] * K)
    return dict(phase="scst", mean_reward=totals["reward"] / n, mean_baseline=totals["baseline"] / n,
                reward_share=round(totals["reward_seconds"] / max(seconds, 1e-9), 4),
                sample_share=round(totals["sample_seconds"] / max(seconds, 1e-9), 4))
