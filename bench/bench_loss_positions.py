"""Training-step time with logits only at target positions (what p2_train does) against full (B, T, vocab) logits.

    .venv/bin/python -m bench.bench_loss_positions [--decoder small|tiny] [--batch-size 32] [--steps 3]

Random weights on CPU. Caption lengths follow a COCO-like spread (8-24 tokens, padded to the longest in the batch);
image tokens are a ViT-H/14's 257 x 1280 (small) or the miniature world's 65 x 128 (tiny). Both variants run the
same forward + backward in this process, alternating, and the ratio of their median step times is printed. Only
the trainable parts (cross-attention, LoRA) get gradients, as in training.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


from hw3.models.gpt2 import Config, Decoder, peft_config

SHAPES = {"small": dict(encoder_dim=1280, tokens=257), "tiny": dict(encoder_dim=128, tokens=65, n_layer=3, n_embd=128,
                                                                      n_head=2, block_size=64)}


def step(decoder, inputs, targets, image, positions: bool) -> float:
    started = time.perf_counter()
    mask = targets != -100
    if positions:
        loss = F.cross_entropy(decoder(inputs, image_tokens=image, positions=mask), targets[mask])
    else:
        logits = decoder(inputs, image_tokens=image)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    decoder.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", choices=sorted(SHAPES), default="small")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up each)")
    args = p.parse_args()
    shape = dict(SHAPES[args.decoder])
    n_tokens = shape.pop("tokens")
    torch.manual_seed(0)
    decoder = Decoder(Config(cross_attn_gate=False, **shape, **peft_config("lora"))).train()
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 25, (args.batch_size,), generator=gen)
    width = int(lengths.max()) + 1
    inputs = torch.randint(0, 50000, (args.batch_size, width), generator=gen)
    targets = inputs.roll(-1, dims=1)
    for row, n in enumerate(lengths.tolist()):
        targets[row, n + 1:] = -100
    image = torch.randn(args.batch_size, n_tokens, shape["encoder_dim"], generator=gen)
    times = {True: [], False: []}
    for positions in (True, False):
        step(decoder, inputs, targets, image, positions)  # warm-up
    for _ in range(args.steps):
        for positions in (True, False):
            times[positions].append(step(decoder, inputs, targets, image, positions))
    full, only = statistics.median(times[False]), statistics.median(times[True])
    share = float((targets != -100).float().mean())
    print("decoder %s, batch %d, %d image tokens, %.0f%% of positions are targets: full logits %.3f s/step, "
          "target positions only %.3f s/step -> %.2fx" % (args.decoder, args.batch_size, n_tokens, 100 * share, full,
                                                          only, full / only))


if __name__ == "__main__":
    main()
