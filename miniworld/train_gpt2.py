"""Pre-trains the tiny GPT-2 language model on world captions and saves it in the course's decoder_model.bin format.

The course file is a plain state dict of the GPT-2 trunk (`wte.weight`, `h.0.attn.c_attn.weight`... Conv1D weights as
(in, out)) with the output head tied to `wte`. World captions use a few dozen of GPT-2's 50,257 tokens, so training
computes the softmax exactly but cheaply: every unused token shares one learned embedding row, which enters the
softmax once with weight log(number of unused tokens). The export writes that shared row into every unused slot, so
the saved file is ordinary GPT-2 giving the same logits, and its repeated rows compress to almost nothing.

Half the documents are one caption, as the course frames them; the other half are two or three captions of the same
scene in a row, each closed by <|endoftext|> (as documents are packed in real pre-training). Within a lone caption the
shapes are interchangeable, and a model trained only on those let its shape embeddings collapse (cosine 0.99 between
" circle" and " star"): its tied head could then barely tell shapes apart, and captioners built on it named colours
right but shapes at chance. In the later captions of a document the objects are known from the earlier ones, so the
model learns to say which shape with confidence, as a real GPT-2 does with words its context pins down.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F


from hw3.util.errors import progress, run_main
from hw3.util.files import atomic_write, write_json
from miniworld import world
from miniworld.cli import run_training, training_parser
from hw3.data.tokenizer import END_TOKEN, BPETokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "models", "decoder_model.bin")

# Settings: the defaults are the committed model's.
SEED = 0
N_LAYER = 3
N_EMBD = 128              # two 64-wide heads: decoder.py infers n_head = n_embd // 64
BLOCK_SIZE = 64
VOCAB_SIZE = 50257
STEPS = 1200
BATCH = 64
LR = 2e-3
WARMUP = 100
WEIGHT_DECAY = 0.01
CORPUS_SCENES = 20000
EVAL_SCENES = 500
OBJECT_COUNT_PROBS = (0.3, 0.4, 0.3)
MULTI_CAPTION_PROB = 0.5  # documents of 2-3 captions of one scene (see the module's docstring)
# The trunk as the course file holds it, per block and around the blocks.
BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
              "mlp.c_proj.bias")


def caption_corpus(seed: int, scenes: int, tokenizer: BPETokenizer, multi: float = MULTI_CAPTION_PROB) -> List[List[int]]:
    """Token ids of documents: <|endoftext|> caption <|endoftext|> as the course trains them, or with probability
    `multi` 2-3 captions of one scene, each closed by <|endoftext|>, as long as they fit BLOCK_SIZE."""
    rng = np.random.default_rng([seed, 21])
    pairs = [(c, s) for c in world.COLOR_NAMES for s in world.SHAPES]
    corpus = []
    for _ in progress(range(scenes), desc="captions", unit="scene", leave=False):
        objects = world.sample_objects(rng, int(rng.choice([1, 2, 3], p=OBJECT_COUNT_PROBS)), pairs)
        captions = [tokenizer.encode(c) + [END_TOKEN] for c in world.scene_captions(rng, objects, 3)]
        if rng.random() < multi:
            doc = [END_TOKEN] + captions[0]
            for more in captions[1:int(rng.integers(2, 4))]:
                if len(doc) + len(more) <= BLOCK_SIZE + 1:
                    doc += more
            corpus.append(doc)
        else:
            corpus += [[END_TOKEN] + c for c in captions[:2]]
    longest = max(len(ids) for ids in corpus)
    assert longest <= BLOCK_SIZE + 1, "a document of %d tokens does not fit block_size %d" % (longest, BLOCK_SIZE)
    return corpus


def batch_of(corpus: List[List[int]], index: np.ndarray):
    """(inputs, targets): inputs padded with <|endoftext|>, targets shifted by one and padded with -100."""
    length = max(len(corpus[i]) for i in index) - 1
    inputs = torch.full((len(index), length), END_TOKEN, dtype=torch.long)
    targets = torch.full((len(index), length), -100, dtype=torch.long)
    for row, i in enumerate(index):
        ids = torch.tensor(corpus[i])
        inputs[row, :len(ids) - 1] = ids[:-1]
        targets[row, :len(ids) - 1] = ids[1:]
    return inputs, targets


class SharedTailLM(torch.nn.Module):
    """GPT-2 trunk (transformers' GPT2Model) over the used tokens only, with a tied head in which every unused
    vocabulary row equals one learned vector: exactly a full-vocabulary GPT-2 whose unused rows are all equal."""

    def __init__(self, used: torch.Tensor, seed: int):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=len(used), n_positions=BLOCK_SIZE, n_embd=N_EMBD, n_layer=N_LAYER,
                            n_head=N_EMBD // 64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)  # ids in the used-token numbering
        self.trunk = GPT2Model(config)  # its wte holds the used tokens' rows, in the order of `used`
        self.register_buffer("used", used)
        self.unused_row = torch.nn.Parameter(torch.randn(N_EMBD) * 0.02)
        self.log_unused = math.log(VOCAB_SIZE - len(used))
        position = torch.full((VOCAB_SIZE,), -1, dtype=torch.long)
        position[used] = torch.arange(len(used))
        self.register_buffer("position", position)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(self.position[inputs]).last_hidden_state  # (B, T, C)
        used_logits = hidden @ self.trunk.wte.weight.t()  # (B, T, U)
        tail = (hidden @ self.unused_row).unsqueeze(-1) + self.log_unused  # (B, T, 1): all unused tokens at once
        logits = torch.cat([used_logits, tail], dim=-1)
        mapped = torch.where(targets >= 0, self.position[targets.clamp(min=0)], targets)
        assert bool((mapped[targets >= 0] >= 0).all()), "a target token is outside the used vocabulary"
        return F.cross_entropy(logits.flatten(0, 1), mapped.flatten(), ignore_index=-100)

    @torch.no_grad()
    def course_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trunk in the course's layout, unused wte rows set to the shared row, in fp16."""
        state = self.trunk.state_dict()
        wte = self.unused_row.expand(VOCAB_SIZE, N_EMBD).clone()
        wte[self.used] = self.trunk.wte.weight
        keys = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
        keys += ["h.%d.%s" % (i, k) for i in range(N_LAYER) for k in BLOCK_KEYS]
        return {k: (wte if k == "wte.weight" else state[k]).detach().half().contiguous() for k in keys}


def shape_ids(tokenizer: BPETokenizer) -> List[int]:
    ids = [tokenizer.encode(" " + shape) for shape in world.SHAPES]
    assert all(len(i) == 1 for i in ids), "every shape word is one GPT-2 token"
    return [i[0] for i in ids]


def shape_cosine(wte: torch.Tensor, tokenizer: BPETokenizer) -> float:
    """Mean cosine similarity between the shape words' embeddings (1.0: the head cannot tell them apart)."""
    e = F.normalize(wte[shape_ids(tokenizer)], dim=-1)
    n = e.shape[0]
    return float(((e @ e.t()).sum() - n) / (n * (n - 1)))


@torch.no_grad()
def later_shape_accuracy(model, docs: List[List[int]], tokenizer: BPETokenizer) -> float:
    """How often the model's top token at a shape word of a document's second or later caption is that shape (the
    shape is known from the earlier captions; chance among shapes is 1/5)."""
    shapes = set(shape_ids(tokenizer))
    hits = total = 0
    for doc in docs:
        ids = model.position[torch.tensor(doc)].unsqueeze(0)
        hidden = model.trunk(ids).last_hidden_state[0]
        predicted = model.used[(hidden @ model.trunk.wte.weight.t()).argmax(-1)]
        first_end = doc.index(END_TOKEN, 1)
        for t in range(first_end + 1, len(doc)):
            if doc[t] in shapes:
                total += 1
                hits += int(predicted[t - 1]) == doc[t]
    return hits / max(total, 1)


def train(out: str, seed: int, steps: int, batch: int) -> Dict[str, float]:
    tokenizer = BPETokenizer()
    corpus = caption_corpus(seed, CORPUS_SCENES, tokenizer)
    held = caption_corpus(seed + 1000, EVAL_SCENES, tokenizer, multi=0.0)
    held_docs = [d for d in caption_corpus(seed + 2000, EVAL_SCENES, tokenizer, multi=1.0) if d.count(END_TOKEN) > 2]
    used = torch.tensor(sorted({t for ids in corpus for t in ids}))
    model = SharedTailLM(used, seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=WEIGHT_DECAY), dict(params=no_decay, weight_decay=0.0)],
                                  lr=LR, betas=(0.9, 0.95))
    schedule = lambda step: min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = np.random.default_rng([seed, 23])
    bar = progress(range(steps), desc="tiny GPT-2", unit="step")
    for _ in bar:
        model.train()
        loss = model(*batch_of(corpus, rng.choice(len(corpus), size=batch, replace=False)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        bar.set_postfix(loss="%.3f" % loss.item())
    model.eval()
    with torch.no_grad():
        eval_loss = float(np.mean([model(*batch_of(held, np.arange(i, min(i + 256, len(held))))).item()
                                   for i in range(0, len(held), 256)]))
        shape_accuracy = later_shape_accuracy(model, held_docs, tokenizer)
    state = model.course_state_dict()
    with atomic_write(out, "wb") as f:
        torch.save(state, f)
    result = dict(train_loss=round(loss.item(), 4), eval_loss=round(eval_loss, 4),
                  later_caption_shape_accuracy=round(shape_accuracy, 4),
                  shape_embedding_cosine=round(shape_cosine(state["wte.weight"].float(), tokenizer), 4), used_tokens=len(used),
                  n_layer=N_LAYER, n_embd=N_EMBD, block_size=BLOCK_SIZE, seed=seed, steps=steps, batch=batch)
    write_json(os.path.splitext(out)[0] + ".log.json", result)
    return result


def main() -> int:
    parser = training_parser(__doc__, OUT, "course-format weight file to write", SEED, "seed of the model and the "
                             "caption corpus", STEPS, BATCH, "captions per step")
    args = parser.parse_args()
    return run_training(args, "tiny GPT-2", lambda: train(args.out, args.seed, args.steps, args.batch))


if __name__ == "__main__":
    run_main(main)
