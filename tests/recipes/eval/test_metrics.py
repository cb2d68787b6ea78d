"""One inner loop: evaluation's answer-adapted fast weights are the training step's.

For every shipped MemDLM variant (`config.VARIANTS`, the default and per-sample fast weights),
the weights `eval_loss(mode="adapted")` scores with (`metrics._gold_adaptation`) equal, bit for
bit, the adapted weights the training step computes (`MemDLM.loss`, the loop's call) from the
same draws: the same anchor, the same inner stream.
"""

from __future__ import annotations

import pytest
import torch

import diffusion as dd
from recipes.memdlm import method
from recipes.memdlm.backbones import adapter
from recipes.memdlm.config import VARIANTS, MemDLMConfig
from recipes.memdlm.data.batches import Batch
from recipes.memdlm.eval import metrics

MASK_ID, VOCAB = 13, 14
MEMDLM = {name: over["memdlm"] for name, (kind, over) in VARIANTS.items() if kind == "memdlm"}
CASES = {
    "default": {},
    "per_sample": {"per_sample": True},
    "per_sample_progressive_memory": {"per_sample": True, "strategy": "progressive_memory"},
    **MEMDLM,
}


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK_ID, (4, 16), generator=g)
    prompt_lengths = torch.tensor([4, 6, 3, 5])
    maskable = torch.arange(16)[None, :] >= prompt_lengths[:, None]
    return Batch(x0, maskable, prompt_lengths)


def test_every_shipped_memdlm_variant_is_covered():
    assert {"progressive_memory", "no_progressive", "leak_free", "full_fast_weights"} <= set(CASES)
    assert len(MEMDLM) == sum(kind == "memdlm" for kind, _ in VARIANTS.values())


@pytest.mark.parametrize("overrides", list(CASES.values()), ids=list(CASES))
def test_answer_adapted_weights_are_the_training_steps(overrides):
    torch.manual_seed(3)
    model = dd.Transformer(VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=32)
    cfg = MemDLMConfig(rank=4, alpha=8.0, inner_lr=1.0, **overrides)
    backbone = adapter(model)
    memdlm = method.MemDLM.on(backbone, cfg, mask_id=MASK_ID)
    batch = _batch()
    streams = method.Generators(torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    model.train()
    draws = memdlm.draw(batch, streams)  # the training loop's draws
    _, parts = memdlm.loss(backbone, draws, log_gap=True)
    model.eval()
    adapted = metrics._gold_adaptation(
        memdlm, backbone, batch, draws.anchor, torch.Generator().manual_seed(2)
    )
    memdlm.close()
    assert adapted.keys() == parts.phi.keys()
    for key, value in adapted.items():
        assert torch.equal(value, parts.phi[key]), key
    # Not vacuous: the inner loop moved phi (where the objective reaches the fast weights) ...
    moved = any(not torch.equal(parts.phi[k], draws.phi0[k]) for k in adapted)
    assert moved or cfg.distill_hidden_layers == "early"
    # ... and the variants that weight by a nominal t (state_times) do not use the ratio.
    if cfg.strategy in ("progressive_memory", "no_progressive"):
        ratio = method.realised_ratio(draws.inputs[0], batch.maskable)
        assert not torch.equal(draws.times[0], ratio.clamp(min=1e-6))
    if cfg.leak_free:
        assert draws.outer.any() and all((draws.outer & ~m).sum() == 0 for m in draws.inputs)
