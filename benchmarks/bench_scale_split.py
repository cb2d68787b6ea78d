"""Hugging Face backbones: what the verified split forward saves, what unfusing experts costs.

1. MemDLM step on a Llama-style decoder made bidirectional (`hf.wrap`), with the split forward
   (layers before the fast-weight layers run once per inner state, without gradient) and with the
   full-forward fallback (`split = False`), against a standard step. Same batch and anchor; each
   step includes backward and the optimizer update.
2. Forward of a Qwen2-MoE model whose last layers' fused experts are rewritten as one linear per
   expert (`hf.UnfusedExperts`, needed for per-expert fast weights) against the fused original.

Steps are timed interleaved in one process (round robin, process CPU time, one thread) and only
ratios of medians are reported.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale_split.py
"""

from __future__ import annotations

import os
import platform
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

try:
    import transformers
except ImportError:  # the optional extra 'hf'
    transformers = None

from recipes.memdlm import method
from recipes.memdlm.backbones import adapter, hf
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.data.batches import Batch

LAYERS, BATCH, LENGTH, VOCAB = 8, 8, 128, 512


def decoder() -> hf.HFDenoiser:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return hf.wrap(transformers.LlamaForCausalLM(config), layer_fraction=0.125)


def moe(unfused: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_experts=16,
        num_experts_per_tok=4,
    )
    model = transformers.Qwen2MoeForCausalLM(config)
    if unfused:
        return hf.wrap(model, layer_fraction=0.125, verify_split=False)
    hf.make_bidirectional(model)
    return hf.HFDenoiser(model, verify_split=False)  # every layer keeps its fused experts


def batch_and_anchor():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(4, VOCAB, (BATCH, LENGTH), generator=g)
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, : LENGTH // 2] = False
    batch = Batch(x0, maskable, torch.full((BATCH,), LENGTH // 2))
    return batch, method.sample_anchor(batch, mask_id=1, eps=1e-3, generator=g)


def step_functions():
    model = decoder()
    assert model.split
    cfg = MemDLMConfig(rank=8, alpha=16.0, layer_fraction=0.125)
    mem = method.make_fast_weights(model, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch, anchor = batch_and_anchor()

    def run(loss, parts):
        method.record_of(loss, parts)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    backbone = adapter(model)
    memdlm_method = method.MemDLM.on(backbone, cfg, mask_id=1, mem=mem)
    standard_method = method.Standard(1)

    def memdlm(split: bool):
        def fn():
            model.split = split
            generator = torch.Generator().manual_seed(1)
            draws = memdlm_method.draw_after(batch, anchor, generator)
            run(*memdlm_method.loss(backbone, draws))

        return fn

    def standard():
        model.split = True
        run(*standard_method.loss(backbone, method.Draws(batch, anchor)))

    return {"standard": standard, "memdlm split": memdlm(True), "memdlm full": memdlm(False)}


def forward_functions():
    fused, unfused = moe(False), moe(True)
    x = torch.randint(4, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))

    def forward(model):
        def fn():
            with torch.no_grad():
                model(x)

        return fn

    return {"fused experts": forward(fused), "last layer unfused": forward(unfused)}


def time_round_robin(functions, repeats: int = 11, warmup: int = 2) -> dict[str, float]:
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def report(title: str, medians: dict[str, float]) -> None:
    base = next(iter(medians.values()))
    print(f"\n{title}")
    print(f"{'':24s} {'median ms':>10s} {'ratio':>7s}")
    for name, median in medians.items():
        print(f"{name:24s} {1000 * median:10.1f} {median / base:7.2f}")


def main() -> None:
    if transformers is None:
        raise SystemExit("this benchmark needs the optional extra 'hf' (transformers)")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, "
        f"batch {BATCH}x{LENGTH}, {LAYERS} layers, fast weights on the last"
    )
    report("training step (Llama-style, d 128)", time_round_robin(step_functions()))
    report("forward (Qwen2-MoE, 16 experts top 4)", time_round_robin(forward_functions()))


def test_memdlm_step_with_split(benchmark):
    if transformers is None:
        pytest.skip("needs the optional extra 'hf' (transformers)")
    benchmark(step_functions()["memdlm split"])


if __name__ == "__main__":
    main()
