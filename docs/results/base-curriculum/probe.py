"""Exploration behind the default base's curriculum (docs/memdlm.md, "The base").

Pretrains the cpu-tiny model the way the recipe does (the standard objective, AdamW, linear
warm-up then cosine decay to 10%, clip 1.0, batch 32) on a sequence of stages, and prints every
`every` steps the share of 64 held-out `single` and `multikey` needles per length that the model
answers exactly in one shot: the whole answer masked, every position's argmax at once (cheaper
than the recipe's step-by-step sampler and never better than it by more than a little).

    OMP_NUM_THREADS=1 python docs/results/base-curriculum/probe.py '{"stages": [{"tasks":
        ["single"], "lengths": [48, 64], "steps": 600}, {"tasks": ["single", "multikey",
        "continuation"], "lengths": [88, 104], "steps": 1400}], "lr": 3e-4, "every": 200}'
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

import diffusion as dd
from recipes.memdlm.backbones import adapter
from recipes.memdlm.data.batches import BatchSampler, collate, encode
from recipes.memdlm.data.tasks import ByteTokenizer, DataError, make_split
from recipes.memdlm.method import sample_anchor, standard_loss

TOK = ByteTokenizer()


def lr_schedule(peak: float, total: int):
    warmup = int(0.1 * total)

    def lr_at(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    return lr_at


def needle_sets(lengths: list[int]) -> dict[str, dict]:
    sets = {}
    for task in ("single", "multikey"):
        for length in lengths:
            try:
                examples = make_split([task], [length], 64, split="eval", seed=0)
            except DataError:  # multikey needs more bytes than the shortest lengths
                continue
            rows = encode(examples, TOK, max_len=512, policy="filter")[0]
            sets[f"{task[0]}{length}"] = collate(rows, TOK.eos_id)
    return sets


@torch.no_grad()
def one_shot_accuracy(model, sets) -> dict[str, float]:
    model.eval()
    scores = {}
    for name, batch in sets.items():
        noisy = batch.x0.masked_fill(batch.maskable, TOK.mask_id)
        right = (model(noisy).argmax(-1) == batch.x0) | ~batch.maskable
        scores[name] = round(right.all(-1).float().mean().item(), 2)
    model.train()
    return scores


def main(args: dict) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(args.get("seed", 1))
    model = dd.Transformer(
        TOK.vocab_size, d_model=128, n_layers=4, n_heads=4, d_ff=256, max_seq_len=512
    )
    stages = args["stages"]
    total = sum(stage["steps"] for stage in stages)
    lr_at = lr_schedule(args.get("lr", 3e-3), total)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_at(0), weight_decay=0.0)
    sets = needle_sets(args.get("eval_lengths", [96, 128, 160]))
    generator = torch.Generator().manual_seed(1)
    step, start = 0, time.time()
    for index, stage in enumerate(stages):
        examples = make_split(stage["tasks"], stage["lengths"], 2000, split="train", seed=index)
        rows = encode(examples, TOK, max_len=512, policy="filter")[0]
        sampler = BatchSampler(rows, 32, seed=index + 1, eos_id=TOK.eos_id)
        for _ in range(stage["steps"]):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            batch = sampler.next()
            anchor = sample_anchor(batch, mask_id=TOK.mask_id, eps=1e-3, generator=generator)
            loss = standard_loss(adapter(model), batch, anchor, None)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % args.get("every", 250) == 0 or step == total:
                elapsed = f"{time.time() - start:.0f}s"
                print(step, elapsed, f"loss {loss.item():.3f}", one_shot_accuracy(model, sets))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
