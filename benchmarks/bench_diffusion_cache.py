"""Long-prompt sampling with Fast-dLLM's KV cache: `diffusion.generate(cache=None|"prefix"|"dual")`.

On the reference `diffusion.Transformer` at the recipe's default size (d_model 128, 4 layers,
4 heads, d_ff 256, a byte-level vocabulary of 260), batch 1, prompts of 1K, 2K and 4K random
tokens, 128 generated tokens in blocks of 32, 128 steps (one token per step, low confidence),
the three modes run side by side in one process. Reported per mode: model calls, the FLOP
estimate of all calls (matrix multiplies only: 2 * queries * (4 d^2 + 3 d d_ff + d V) for the
projections and the head, plus 4 * queries * keys * d per layer for the attention scores and
their weighted sum), the wall-clock time (best of `--repeats`) and its ratio to the uncached
run, and the fraction of generated tokens equal to the uncached output (the cache is an
approximation for a bidirectional model; with random weights this number says little about a
trained model's accuracy, see docs/diffusion.md for the NIAH measurement).

    OMP_NUM_THREADS=1 python benchmarks/bench_diffusion_cache.py [--prompts 1024 2048 4096]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import platform
import time

import torch

import diffusion as dd

VOCAB, D_MODEL, N_LAYERS, N_HEADS, D_FF = 260, 128, 4, 4, 256
GEN, BLOCK, STEPS = 128, 32, 128
MODES = (None, "prefix", "dual")


class Counting(torch.nn.Module):
    """The model behind the three calls `generate` makes, recording (queries, keys) per call."""

    def __init__(self, model: dd.Transformer):
        super().__init__()
        self.model = model
        self.calls: list[tuple[int, int]] = []

    def forward(self, x, attention_mask=None):
        self.calls.append((x.shape[1], x.shape[1]))
        return self.model(x, attention_mask)

    def forward_with_cache(self, x, attention_mask=None):
        self.calls.append((x.shape[1], x.shape[1]))
        return self.model.forward_with_cache(x, attention_mask)

    def forward_from_cache(self, tokens, cache, *, start, attention_mask=None):
        self.calls.append((tokens.shape[1], cache[0][0].shape[2]))
        return self.model.forward_from_cache(
            tokens, cache, start=start, attention_mask=attention_mask
        )


def flops(calls: list[tuple[int, int]]) -> float:
    per_query = 2 * (4 * D_MODEL**2 + 3 * D_MODEL * D_FF) * N_LAYERS + 2 * D_MODEL * VOCAB
    return float(sum(q * per_query + 4 * q * k * D_MODEL * N_LAYERS for q, k in calls))


def run(prompt_length: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = dd.Transformer(
        VOCAB,
        d_model=D_MODEL,
        n_layers=N_LAYERS,
        n_heads=N_HEADS,
        d_ff=D_FF,
        max_seq_len=prompt_length + GEN,
    ).eval()
    counting = Counting(model)
    prompt = torch.randint(
        0, VOCAB - 1, (1, prompt_length), generator=torch.Generator().manual_seed(1)
    )
    rows, outputs = [], {}
    for mode in MODES:
        best = float("inf")
        for _ in range(repeats):
            counting.calls.clear()
            start = time.perf_counter()
            out = dd.generate(
                counting,
                prompt,
                mask_id=VOCAB - 1,
                gen_length=GEN,
                steps=STEPS,
                block_length=BLOCK,
                cache=mode,
            )
            best = min(best, time.perf_counter() - start)
        outputs[mode] = out[0, prompt_length:]
        rows.append(
            dict(
                mode=mode or "none", calls=len(counting.calls), flops=flops(counting.calls), s=best
            )
        )
    for row, mode in zip(rows, MODES):
        row["speedup"] = rows[0]["s"] / row["s"]
        row["flop_ratio"] = rows[0]["flops"] / row["flops"]
        row["same"] = float((outputs[mode] == outputs[None]).double().mean())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, threads {torch.get_num_threads()}"
    )
    print("| prompt | cache | model calls | GFLOP | FLOP ratio | wall s | speedup | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for prompt_length in args.prompts:
        for r in run(prompt_length, args.repeats):
            print(
                f"| {prompt_length} | {r['mode']} | {r['calls']} | {r['flops'] / 1e9:.1f} | "
                f"{r['flop_ratio']:.1f}x | {r['s']:.2f} | **{r['speedup']:.2f}x** | "
                f"{r['same']:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
