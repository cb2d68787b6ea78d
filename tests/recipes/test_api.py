"""The inference API (recipes/memdlm/api.py): `recipes.memdlm.generate` and its parts."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import diffusion as dd
import memory as mm
import recipes.memdlm as memdlm
from recipes.memdlm import method
from recipes.memdlm.config import MemDLMConfig

MASK = 49
CONFIG = {"rank": 4, "alpha": 8.0, "layer_fraction": 0.5, "inner_lr": 0.3}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return dd.Transformer(50, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64).eval()


@pytest.fixture
def prompts():
    return torch.randint(0, 48, (3, 20), generator=torch.Generator().manual_seed(1))


def hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_without_adaptation_it_is_plain_sampling(model, prompts):
    out = memdlm.generate(model, prompts, mask_id=MASK, gen_length=8, steps=8, adapt=False)
    expected = dd.generate(model, prompts, mask_id=MASK, gen_length=8, steps=8)
    assert torch.equal(out, expected)


def test_without_a_generator_repeated_samples_differ_and_a_seed_repeats_them(model, prompts):
    """generator=None is torch's global random state, not a hidden fixed seed."""
    sampler = {"gen_length": 8, "steps": 8, "temperature": 1.0, "remasking": "random"}
    torch.manual_seed(3)
    first = memdlm.generate(model, prompts, mask_id=MASK, config=CONFIG, **sampler)
    second = memdlm.generate(model, prompts, mask_id=MASK, config=CONFIG, **sampler)
    assert not torch.equal(first, second)
    torch.manual_seed(3)
    assert torch.equal(
        memdlm.generate(model, prompts, mask_id=MASK, config=CONFIG, **sampler), first
    )
    seeded = [
        memdlm.generate(
            model,
            prompts,
            mask_id=MASK,
            config=CONFIG,
            generator=torch.Generator().manual_seed(5),
            **sampler,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert torch.equal(*seeded)


def test_adaptation_then_sampling_is_the_recipe_composed(model, prompts):
    """generate = fresh fast weights, the recipe's prompt adaptation, sampling with them bound."""
    sampler = {"gen_length": 8, "steps": 4, "temperature": 0.7, "remasking": "random"}
    out = memdlm.generate(
        model,
        prompts,
        mask_id=MASK,
        config=CONFIG,
        generator=torch.Generator().manual_seed(7),
        **sampler,
    )
    cfg = MemDLMConfig(**CONFIG)
    generator = torch.Generator().manual_seed(7)
    mem = method.make_fast_weights(model, cfg)
    phi = method.adapt_to_prompt(model, mem, prompts, cfg, mask_id=MASK, generator=generator)
    with torch.no_grad(), mem.bind(phi):
        expected = dd.generate(model, prompts, mask_id=MASK, generator=generator, **sampler)
    mem.remove()
    assert torch.equal(out, expected)
    assert torch.equal(out[:, :20], prompts) and not bool((out == MASK).any())
    assert hooks(model) == 0  # the fast weights it made are gone: the model is as before


def test_adapted_fast_weights_reconstruct_the_prompt_better(model, prompts):
    """Each inner step descends the masked-prompt loss, so with the adapted weights bound the
    model reconstructs randomly masked prompt tokens better (paired masks, 16 draws)."""
    cfg = {**CONFIG, "grad_transform": "normalize"}
    mem = memdlm.fast_weights_for(model, cfg)
    phi = memdlm.adapt_prompt(model, prompts, mask_id=MASK, fast_weights=mem, config=cfg)
    b = phi["layers.1.mlp.down_proj.B"]
    assert b.shape == (3, 32, 4)  # one set per prompt
    assert bool((b.flatten(1).norm(dim=1) > 0).all())  # B starts at 0: every prompt moved it

    def masked_prompt_loss(bound: bool) -> float:
        g = torch.Generator().manual_seed(5)
        total = 0.0
        for _ in range(16):
            mask = torch.rand(prompts.shape, generator=g) < 0.3
            with torch.no_grad(), mem.bind(phi) if bound else contextlib.nullcontext():
                logits = model(torch.where(mask, MASK, prompts))
            ce = F.cross_entropy(logits.transpose(1, 2), prompts, reduction="none")
            total += float((ce * mask).sum() / mask.sum())
        return total / 16

    before, after = masked_prompt_loss(False), masked_prompt_loss(True)
    assert after < before - 0.02, (before, after)


def test_given_fast_weights_are_used_and_kept(model, prompts):
    mem = mm.FastLoRA(model, ["layers.1.mlp.down_proj"], rank=2, alpha=2.0)
    out = memdlm.generate(
        model, prompts, mask_id=MASK, gen_length=4, steps=4, fast_weights=mem, config=CONFIG
    )
    assert out.shape == (3, 24) and hooks(model) == 1
    phi = memdlm.adapt_prompt(model, prompts, mask_id=MASK, fast_weights=mem, config=CONFIG)
    assert set(phi) == {"layers.1.mlp.down_proj.A", "layers.1.mlp.down_proj.B"}
    mem.remove()


class OwnModel(torch.nn.Module):
    """A user's model without the split forward: an MLP denoiser with a `layers` stack."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {"up_proj": torch.nn.Linear(16, 32), "down_proj": torch.nn.Linear(32, 16)}
            )
            for _ in range(2)
        )
        self.head = torch.nn.Linear(16, 50)

    def forward(self, x):
        h = self.embed(x)
        h = h + h.mean(1, keepdim=True)  # every position sees the sequence
        for layer in self.layers:
            h = h + layer["down_proj"](torch.tanh(layer["up_proj"](h)))
        return self.head(h)


def test_a_model_without_the_split_forward_adapts_through_full_forwards(prompts):
    torch.manual_seed(0)
    own = OwnModel()
    cfg = {**CONFIG, "targets": ["up_proj", "down_proj"]}
    out = memdlm.generate(own, prompts, mask_id=MASK, gen_length=6, steps=3, config=cfg)
    assert out.shape == (3, 26) and torch.equal(out[:, :20], prompts)
    assert not bool((out == MASK).any()) and hooks(own) == 0


def test_errors_name_the_problem(model, prompts):
    with pytest.raises(ValueError, match="unknown keys \\['inner_lrr'\\]"):
        memdlm.generate(
            model, prompts, mask_id=MASK, gen_length=4, steps=4, config={"inner_lrr": 1}
        )
    with pytest.raises(TypeError, match="no `layers` stack"):
        memdlm.generate(torch.nn.Linear(4, 4), prompts, mask_id=MASK, gen_length=4, steps=4)
    mem = memdlm.fast_weights_for(model, CONFIG)
    with pytest.raises(ValueError, match="contains the mask id 49"):
        memdlm.adapt_prompt(model, torch.full_like(prompts, MASK), mask_id=MASK, fast_weights=mem)
    with pytest.raises(ValueError, match="integer tensor"):
        memdlm.adapt_prompt(model, prompts.float(), mask_id=MASK, fast_weights=mem)
    mem.remove()
    with pytest.raises(ValueError, match="no attention_mask"):
        memdlm.generate(
            model,
            prompts,
            mask_id=MASK,
            gen_length=4,
            steps=4,
            attention_mask=torch.ones_like(prompts, dtype=torch.bool),
        )


def test_a_hugging_face_model_generates_with_adaptation(tmp_path, prompts):
    transformers = pytest.importorskip("transformers")
    from recipes.memdlm.backbones import hf

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = hf.wrap(transformers.BertForMaskedLM(config).eval(), layer_fraction=0.5)
    out = memdlm.generate(model, prompts, mask_id=MASK, gen_length=4, steps=4, config=CONFIG)
    assert out.shape == (3, 24) and torch.equal(out[:, :20], prompts)
    assert not bool((out == MASK).any()) and hooks(model) == 0
