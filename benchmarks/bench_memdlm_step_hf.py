"""Cost of a MemDLM training step relative to a standard step on a Hugging Face backbone
(issue 30 item 6: at most 1.40x).

A transformers `LlamaForCausalLM` (8 layers, d=128, 4 heads, d_ff=512, vocabulary `--vocab`),
saved and loaded back as a user's checkpoint is, wrapped as the recipe wraps Hugging Face models
(`backbones.hf.wrap`: bidirectional attention, the split forward and the tail checked on a probe).
Batch (8, 256) of random tokens, the first 32 positions a prompt (not maskable; `--prompt`: the
losses score about half the maskable positions, so it sets the inner steps' rows); fast weights on
the last 10% of layers' FFN (the defaults: layer 7's gate/up/down_proj). One step = loss,
backward, gradient clipping and AdamW. Standard and MemDLM (gap diagnostic on and off) run round
robin in one process; the ratio of medians of process time is reported, with the minor page
faults per step. A plain Python process calling the library, so glibc's thresholds are whatever
the library sets (`allocator.py`); `--full-tail` measures without the scored-rows tail and
the fused head (the backbone as it was before them); `--floor` also times the standard step
plus one forward pass of the pre-anchor state without gradient (MemDLM's least possible cost);
`--unshared` also times MemDLM without the last FFN's start shared on the anchor's rows;
`--flops` also counts each step's matmul and attention FLOPs and their ratio (machine-independent).

    OMP_NUM_THREADS=1 python benchmarks/bench_memdlm_step_hf.py [--vocab 32000] [--full-tail]
        [--floor] [--unshared] [--flops]
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_memdlm_step_hf.py --benchmark-only
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from dataclasses import replace

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from bench_memdlm_step import full_step, print_flops, print_ratios, time_round_robin

from recipes.memdlm import method
from recipes.memdlm.backbones import adapter, hf
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.data.batches import Batch

LAYERS, WIDTH, HEADS, FFN = 8, 128, 4, 512
BATCH, LENGTH, PROMPT = 8, 256, 32


def make_model(vocab: int, full_tail: bool = False) -> hf.HFDenoiser:
    """The Llama model, written to a folder and loaded from it, then `hf.wrap`ped."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=WIDTH,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=LENGTH,
        attn_implementation="sdpa",
    )
    with tempfile.TemporaryDirectory() as folder:
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        loaded = transformers.LlamaForCausalLM.from_pretrained(folder)
    model = hf.wrap(loaded, layer_fraction=MemDLMConfig().layer_fraction)
    if full_tail:  # as before the tail: the logits path and splits between layers only
        model.tail, model.tail_rows = None, False
    return model.train()


def make_batch(vocab: int, prompt: int = PROMPT):
    """(batch, anchor): random tokens (mask id vocab - 1 never among them), a `prompt`-token
    prompt in every row."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, vocab - 1, (BATCH, LENGTH), generator=generator)
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, :prompt] = False
    batch = Batch(x0, maskable, torch.full((BATCH,), prompt))
    anchor = method.sample_anchor(batch, mask_id=vocab - 1, eps=1e-3, generator=generator)
    return batch, anchor


def step_functions(model, batch, anchor, mask_id: int, floor: bool = False, unshared=False):
    """The two steps as training runs them: the methods built once on the backbone resolved
    once (`loop.train_phase`), the step record read back, backward, clip, AdamW. floor: also
    the standard step plus the pre-anchor state's early layers without gradient, the part of
    a MemDLM step that is one more forward pass (what MemDLM would cost with a free inner loop
    and no diagnostic). unshared: also MemDLM without sharing the last FFN's start among the
    losses on the anchor's rows (`losses.SharedRows`), as before it existed."""
    run = full_step(model)
    backbone = adapter(model)

    standard = method.Standard(mask_id)
    memdlm_method = method.MemDLM.on(backbone, MemDLMConfig(), mask_id=mask_id)

    def memdlm(log_gap: bool, share: bool = True):
        generator = torch.Generator().manual_seed(1)

        def fn():
            draws = memdlm_method.draw_after(batch, anchor, generator)
            if not share:
                draws = replace(draws, anchor_scores_outer=False)
            run(*memdlm_method.loss(backbone, draws, log_gap=log_gap))

        return fn

    def standard_plus_pre_anchor():
        draws = memdlm_method.draw_after(batch, anchor, torch.Generator().manual_seed(1))
        pre_anchor = torch.where(draws.inputs[0], mask_id, batch.x0)
        with torch.no_grad():
            memdlm_method.split(backbone).early(pre_anchor)
        run(*standard.loss(backbone, method.Draws(batch, anchor)))

    functions = {
        "standard": lambda: run(*standard.loss(backbone, method.Draws(batch, anchor))),
        "memdlm (gap logged)": memdlm(True),
        "memdlm (no gap)": memdlm(False),
    }
    if floor:
        functions["standard + pre-anchor pass"] = standard_plus_pre_anchor
    if unshared:
        functions["memdlm (gap, unshared)"] = memdlm(True, share=False)
        functions["memdlm (no gap, unshared)"] = memdlm(False, share=False)
    return functions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=32000, help="LlamaConfig's default")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--prompt", type=int, default=PROMPT, help="unmaskable positions per row")
    parser.add_argument("--full-tail", action="store_true", help="without the scored-rows tail")
    parser.add_argument(
        "--floor", action="store_true", help="also time standard + the pre-anchor forward pass"
    )
    parser.add_argument(
        "--unshared", action="store_true", help="also MemDLM without the shared FFN start"
    )
    parser.add_argument("--flops", action="store_true", help="also count each step's FLOPs")
    args = parser.parse_args()
    model = make_model(args.vocab, args.full_tail)
    batch, anchor = make_batch(args.vocab, args.prompt)
    functions = step_functions(
        model, batch, anchor, mask_id=args.vocab - 1, floor=args.floor, unshared=args.unshared
    )
    times, faults = time_round_robin(functions, args.repeats)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads "
        f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, batch {tuple(batch.x0.shape)}"
        f", prompt {args.prompt}, {int(anchor.mask.sum())} anchor-masked positions, vocab "
        f"{args.vocab}, {model.description(MemDLMConfig().layer_fraction)}"
    )
    rows = getattr(model, "tail_rows", False)  # (absent before the tail existed)
    print(f"tail: {getattr(model, 'tail_note', '-')}; scored-rows tail {'on' if rows else 'off'}")
    print_ratios(times, faults, width=24)
    if args.flops:
        print_flops(functions)


def test_memdlm_step_hf(benchmark):
    model = make_model(512)
    batch, anchor = make_batch(512)
    benchmark(step_functions(model, batch, anchor, mask_id=511)["memdlm (gap logged)"])


if __name__ == "__main__":
    main()
