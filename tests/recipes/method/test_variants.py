"""The reference code's other inner losses, schedules and epochs, and the two controls, each
against a hand-written loop over the same draws.

The loop below is written from the definitions in docs/memdlm.md ("Options of the reference
code") independently of `memory`, `bilevel` and the recipe's inner loop: fast LoRA weights enter
as merged weights W + (alpha/r) B A through `torch.func.functional_call`, gradients come from
`torch.autograd.grad`, and the per-tensor clip and the SGD update are spelled out. Only the
random draws (masks, phi_0, the leak-free outer positions) are taken from the recipe, so that
both sides see the same ones.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import diffusion as dd
from recipes.memdlm import method
from recipes.memdlm.backbones import adapter
from recipes.memdlm.config import MemDLMConfig
from tests.recipes.method.test_step import MASK_ID, VOCAB, fixed_batch


def model_of(layers: int) -> torch.nn.Module:
    torch.manual_seed(3)
    model = dd.Transformer(VOCAB, d_model=16, n_layers=layers, n_heads=2, d_ff=24, max_seq_len=32)
    return model.double()


def nominal_times(cfg: MemDLMConfig, anchor_t, n_states):
    """The t of each state's 1/t weight where it is not the realised ratio (by hand)."""
    if cfg.strategy == "no_progressive":
        return [anchor_t] * n_states
    if cfg.strategy == "progressive_memory":
        k, rho = cfg.inner_steps, cfg.prompt_anchor_ratio
        ratios = [rho] if k == 1 else [0.8 + (rho - 0.8) * s / (k - 1) for s in range(k)]
        return [torch.full_like(anchor_t, r) for r in ratios * cfg.inner_epochs]
    return [None] * n_states


def reference_step(model, batch, anchor, draws, cfg: MemDLMConfig, names):
    """One MemDLM step from the definitions: returns (outer loss, inner losses)."""
    params = dict(model.named_parameters())
    scale = cfg.alpha / cfg.rank
    x0, maskable = batch.x0, batch.maskable
    n_layers = len(model.layers)
    captured = {}

    def run(x, phi):
        merged = dict(params)
        for name in names:
            merged[f"{name}.weight"] = params[f"{name}.weight"] + scale * (
                phi[f"{name}.B"] @ phi[f"{name}.A"]
            )
        return torch.func.functional_call(model, merged, (x,))

    def outputs(x, phi):
        """What the inner loss compares: logits, final features or early features."""
        logits = run(x, phi)
        if cfg.inner_loss != "distill_hidden":
            return logits
        if cfg.distill_hidden_layers == "early":
            return model.norm(captured[max(1, int(n_layers * cfg.layer_fraction)) - 1])
        return captured["norm"]

    hooks = [model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("norm", o))]
    for index, layer in enumerate(model.layers):
        hooks.append(
            layer.register_forward_hook(lambda m, i, o, k=index: captured.__setitem__(k, o))
        )

    def per_token(student, teacher):
        if cfg.inner_loss == "ce":
            return F.cross_entropy(student.transpose(1, 2), x0, reduction="none")
        if cfg.inner_loss == "distill_hidden":
            if cfg.distill_hidden_type == "cosine":
                cos = (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
                return 1 - cos
            return ((student - teacher) ** 2).mean(-1)
        tau = cfg.distill_temperature
        p_s, p_t = (student / tau).softmax(-1), (teacher / tau).softmax(-1)
        if cfg.inner_loss == "distill":  # KL(teacher || student)
            return (p_t * (p_t.log() - p_s.log())).sum(-1)
        return (p_s * (p_s.log() - p_t.log())).sum(-1)  # KL(student || teacher)

    n = maskable.sum(1).double()
    times = nominal_times(cfg, anchor.t, len(draws.inputs))
    phi = {k: v.clone().requires_grad_(True) for k, v in draws.phi0.items()}
    losses = []
    for inp, target, teacher_mask, t in zip(draws.inputs, draws.targets, draws.teachers, times):
        x_in = torch.where(inp, MASK_ID, x0)
        x_teacher = x0 if teacher_mask is None else torch.where(teacher_mask, MASK_ID, x0)
        r = inp.sum(1) / n if t is None else t
        with torch.no_grad():
            teacher = outputs(x_teacher, phi) if cfg.inner_loss != "ce" else None
        z = outputs(x_in, phi)
        inner = (per_token(z, teacher) * target / r[:, None]).sum() / target.sum()
        losses.append(inner.item())
        grads = torch.autograd.grad(inner, list(phi.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, phi.values())]
        grads = [g * torch.clamp(cfg.inner_clip / (g.norm() + 1e-12), max=1.0) for g in grads]
        phi = {
            k: (p - cfg.inner_lr * g).detach().requires_grad_(True)
            for (k, p), g in zip(phi.items(), grads)
        }
    for hook in hooks:
        hook.remove()
    phi = {k: v.detach() for k, v in phi.items()}
    ce = F.cross_entropy(run(anchor.xt, phi).transpose(1, 2), x0, reduction="none")
    if draws.outer is None:
        loss = (ce * anchor.mask / anchor.t[:, None]).sum() / maskable.sum()
    else:  # the leak-free control: O only, weight 1 / (t q)
        q = cfg.leak_free_fraction
        loss = (ce * draws.outer / (anchor.t[:, None] * q)).sum() / maskable.sum()
    return loss, losses


BASE = dict(rank=4, alpha=8.0, inner_lr=1.0, inner_clip=0.5)
CASES = {
    "ce": MemDLMConfig(**BASE),
    "distill": MemDLMConfig(**BASE, inner_loss="distill"),
    "distill_reverse_tau2": MemDLMConfig(
        **BASE, inner_loss="distill_reverse", distill_temperature=2.0
    ),
    "distill_hidden_mse": MemDLMConfig(**BASE, inner_loss="distill_hidden"),
    "distill_hidden_cosine": MemDLMConfig(
        **BASE, inner_loss="distill_hidden", distill_hidden_type="cosine"
    ),
    "distill_hidden_early": MemDLMConfig(
        **BASE, inner_loss="distill_hidden", distill_hidden_layers="early", layer_fraction=0.75
    ),
    "no_progressive": MemDLMConfig(**BASE, strategy="no_progressive"),
    "progressive_memory_k3": MemDLMConfig(**BASE, strategy="progressive_memory", inner_steps=3),
    "progressive_memory_distill": MemDLMConfig(
        **BASE, strategy="progressive_memory", inner_steps=3, inner_loss="distill"
    ),
    "pmc_k3_two_epochs": MemDLMConfig(**BASE, inner_steps=3, inner_epochs=2),
    "pre_only_newly_revealed": MemDLMConfig(
        **BASE, strategy="pre_only", inner_loss_mask="newly_revealed"
    ),
    "distill_newly_revealed": MemDLMConfig(
        **BASE, inner_loss="distill", inner_loss_mask="newly_revealed"
    ),
    "leak_free": MemDLMConfig(**BASE, leak_free=True),
    "leak_free_distill_progressive": MemDLMConfig(
        **BASE, leak_free=True, inner_loss="distill", strategy="progressive_memory"
    ),
}


@pytest.mark.parametrize("cfg", list(CASES.values()), ids=list(CASES))
def test_step_equals_the_hand_written_loop(cfg):
    model = model_of(4 if cfg.distill_hidden_layers == "early" else 2)
    batch, anchor, _ = fixed_batch()
    backbone = adapter(model)
    memdlm = method.MemDLM.on(backbone, cfg, mask_id=MASK_ID)
    mem = memdlm.mem
    draws = memdlm.draw_after(batch, anchor, torch.Generator().manual_seed(5))
    loss, parts = memdlm.loss(backbone, draws, log_gap=True)
    off, info = parts.loss_off, parts.info
    loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    targets = mem.targets
    mem.remove()
    ref_loss, ref_inner = reference_step(model, batch, anchor, draws, cfg, targets)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert info.loss.tolist() == pytest.approx(ref_inner, rel=1e-9, abs=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-8, atol=1e-12, msg=name)
    assert abs(off.item() - loss.item()) > 1e-6  # the inner loop changed phi: not vacuous


def test_early_hidden_distillation_before_the_fast_layers_leaves_phi_unchanged():
    """The reference code's early-layer mode with the default fraction reads the first
    int(L * 0.1) layers (at least one), before the fast weights of the last layers: phi gets no
    gradient and the inner loop is a no-op (the same is true of the reference code)."""
    cfg = MemDLMConfig(**{**BASE, "layer_fraction": 0.1}, inner_loss="distill_hidden")
    cfg.distill_hidden_layers = "early"
    model = model_of(4)
    batch, anchor, _ = fixed_batch()
    backbone = adapter(model)
    memdlm = method.MemDLM.on(backbone, cfg, mask_id=MASK_ID)
    draws = memdlm.draw_after(batch, anchor, torch.Generator().manual_seed(5))
    loss, parts = memdlm.loss(backbone, draws, log_gap=True)
    off, info = parts.loss_off, parts.info
    memdlm.close()
    assert info.grad_norm.abs().max().item() == 0.0
    assert off.item() == loss.item()


def test_token_divergences_against_their_definitions():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    for tau in (1.0, 0.5):
        p = torch.distributions.Categorical(logits=student / tau)
        q = torch.distributions.Categorical(logits=teacher / tau)
        forward = method.token_divergence(student, teacher, "distill", tau)
        reverse = method.token_divergence(student, teacher, "distill_reverse", tau)
        torch.testing.assert_close(forward, torch.distributions.kl_divergence(q, p))
        torch.testing.assert_close(reverse, torch.distributions.kl_divergence(p, q))
    mse = method.token_divergence(student, teacher, "distill_hidden", hidden_type="mse")
    cosine = method.token_divergence(student, teacher, "distill_hidden", hidden_type="cosine")
    for b in range(2):
        for i in range(3):
            s, t = student[b, i].tolist(), teacher[b, i].tolist()
            assert mse[b, i].item() == pytest.approx(sum((x - y) ** 2 for x, y in zip(s, t)) / 5)
            dot = sum(x * y for x, y in zip(s, t))
            norms = math.sqrt(sum(x * x for x in s)) * math.sqrt(sum(y * y for y in t))
            assert cosine[b, i].item() == pytest.approx(1 - dot / norms, rel=1e-5)
    same = method.token_divergence(student, student, "distill")
    assert same.abs().max().item() < 1e-6  # KL(p || p) = 0


def test_leak_free_inner_loop_never_sees_the_outer_targets():
    cfg = MemDLMConfig(leak_free=True, inner_steps=3, inner_epochs=2, inner_loss="distill")
    model = model_of(2)
    batch, anchor, _ = fixed_batch()
    backbone = adapter(model)
    memdlm = method.MemDLM.on(backbone, cfg, mask_id=MASK_ID)
    draws = memdlm.draw_after(batch, anchor, torch.Generator().manual_seed(1))
    plain = replace(memdlm, cfg=cfg.model_copy(update={"leak_free": False}))
    plain = plain.draw_after(batch, anchor, torch.Generator().manual_seed(1))
    memdlm.close()
    outer = draws.outer
    assert outer.any() and (outer & ~anchor.mask).sum() == 0 and (anchor.mask & ~outer).any()
    for inp, target, teacher in zip(draws.inputs, draws.targets, draws.teachers):
        assert (outer & ~inp).sum() == 0  # O is masked in every inner input ...
        assert (outer & target).sum() == 0  # ... scored by no inner loss ...
        assert (outer & ~teacher).sum() == 0  # ... and masked for the teacher too
    # The draws before O are those of the run without the control (same stream, same order).
    for a, b in zip(draws.inputs, plain.inputs):
        assert torch.equal(a, b)
    for key in plain.phi0:
        assert torch.equal(draws.phi0[key], plain.phi0[key])
    # The anchor is the last inner input (its early states are the outer pass's).
    assert draws.anchor_index == len(draws.inputs) - 1
    assert torch.equal(draws.inputs[-1], anchor.mask)


def test_leak_free_outer_loss_is_unbiased_for_the_standard_loss():
    """E over O of sum_{i in O} CE_i / (t q) = sum_{i in M_t} CE_i / t: averaged over many
    draws of O, the leak-free outer weights give each anchor-masked position weight 1/t."""
    _, anchor, _ = fixed_batch()
    q, draws = 0.5, 4000
    g = torch.Generator().manual_seed(2)
    total = torch.zeros(anchor.mask.shape, dtype=torch.float64)
    for _ in range(draws):
        total += method.outer_positions(anchor.mask, q, g).double() / q
    mean = total / draws
    assert (mean[~anchor.mask] == 0).all()
    # Each entry is a mean of Bernoulli(q)/q: sd sqrt((1-q)/q / draws) = 0.016; 5 sd.
    assert (mean[anchor.mask] - 1).abs().max().item() < 0.08


def test_progressive_memory_masks_follow_the_reference_schedule():
    cfg = MemDLMConfig(strategy="progressive_memory", inner_steps=4, prompt_anchor_ratio=0.2)
    assert method.progressive_ratios(cfg) == pytest.approx([0.8, 0.6, 0.4, 0.2])
    batch, anchor, _ = fixed_batch()
    g = torch.Generator().manual_seed(0)
    masks = method.trajectory_masks(anchor.mask, batch.maskable, cfg, g)
    n = batch.maskable.sum(1)
    assert len(masks) == 4 and (masks[0] & ~batch.maskable).sum() == 0
    for ratio, previous, current in zip([0.6, 0.4, 0.2], masks, masks[1:]):
        assert (current & ~previous).sum() == 0  # reveals only
        expected = torch.minimum(previous.sum(1), torch.floor(n * ratio).long())
        assert torch.equal(current.sum(1), expected)
    times = method.state_times(cfg, anchor.t, 4)
    assert [t[0].item() for t in times] == pytest.approx([0.8, 0.6, 0.4, 0.2])


def test_epochs_repeat_the_trajectory_from_its_first_state():
    batch, anchor, _ = fixed_batch()
    two = MemDLMConfig(inner_epochs=2)
    masks = method.trajectory_masks(anchor.mask, batch.maskable, two, torch.Generator())
    assert len(masks) == 4 and masks[0] is masks[2] and masks[1] is masks[3] is anchor.mask
    assert method.teacher_masks(masks, anchor.mask, two) == [anchor.mask, None] * 2
    three = MemDLMConfig(inner_steps=3, inner_epochs=2)
    masks = method.trajectory_masks(anchor.mask, batch.maskable, three, torch.Generator())
    assert len(masks) == 6 and masks[0] is masks[3] and masks[2] is masks[5] is anchor.mask
    pre_only = MemDLMConfig(strategy="pre_only")
    pre = method.trajectory_masks(anchor.mask, batch.maskable, pre_only, torch.Generator())
    teachers = method.teacher_masks(pre, anchor.mask, pre_only)
    assert teachers == [anchor.mask]  # the reference code's next state of pre_only: x_t
    newly = method.loss_masks(pre, anchor.mask, "newly_revealed", teachers)
    assert torch.equal(newly[0], pre[0] & ~anchor.mask)


@pytest.mark.parametrize(
    ("update", "passes"),
    [
        ({}, 2),
        ({"inner_steps": 3, "inner_epochs": 2}, 6),
        ({"strategy": "pre_only"}, 1),
        ({"strategy": "no_progressive", "inner_epochs": 2}, 2),
        ({"strategy": "progressive_memory", "inner_steps": 4}, 4),
    ],
)
def test_inner_passes_count_the_inner_forward_backward_passes(update, passes):
    cfg = MemDLMConfig(**update)
    assert cfg.inner_passes() == passes
    batch, anchor, _ = fixed_batch()
    assert len(method.trajectory_masks(anchor.mask, batch.maskable, cfg, torch.Generator())) == (
        passes
    )
