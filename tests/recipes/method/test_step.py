"""The MemDLM step against a hand-written loop of the reference pseudocode, and its invariants.

The reference (memdlm-method.md section 2.4) is written here independently of `memory` and
`bilevel`: fast LoRA weights enter as merged weights W + (alpha/r) B A through
`torch.func.functional_call`, gradients come from `torch.autograd.grad`, and the per-tensor clip
and SGD update are spelled out. The one deliberate difference from the reference code is the
weight 1/t without the code's additive 1e-6 (DESIGN.md: schedules clamp t instead).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import diffusion as dd
from recipes.memdlm import method
from recipes.memdlm.backbones import adapter
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.data.batches import Batch, Encoded, collate
from recipes.memdlm.loop.schedule import cosine_with_warmup
from recipes.memdlm.method import inner as method_inner
from recipes.memdlm.method import trajectory as traj
from tests.memory.test_at_init import CountMatmuls

MASK_ID, VOCAB = 13, 14


class StepOut(NamedTuple):
    loss: torch.Tensor
    metrics: dict


def memdlm_step(model, mem, batch, anchor, cfg, *, generator, log_gap, mask_id=MASK_ID, **options):
    """One MemDLM step as the training loop runs it after its anchor: `MemDLM.draw_after`, then
    `MemDLM.loss`, and the step record (`method.record_of`). options: loss_backend, compiler."""
    compiler = options.pop("compiler", None)
    backbone = adapter(model)
    memdlm = method.MemDLM.on(backbone, cfg, mask_id=mask_id, mem=mem, **options)
    if compiler is not None:
        memdlm = memdlm.compiled(compiler)
    draws = memdlm.draw_after(batch, anchor, generator)
    loss, parts = memdlm.loss(backbone, draws, log_gap=log_gap)
    return StepOut(loss, method.record_of(loss, parts))


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(3)
    model = dd.Transformer(VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=32)
    return model.double()


def fixed_batch() -> tuple[Batch, method.Anchor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK_ID, (3, 12), generator=g)
    prompt_lengths = torch.tensor([4, 5, 3])
    maskable = torch.arange(12)[None, :] >= prompt_lengths[:, None]
    t = torch.tensor([0.3, 0.6, 0.45], dtype=torch.float64)
    anchor_mask = (torch.rand(3, 12, generator=g) < t[:, None]) & maskable
    anchor_mask[:, -1] = True  # every row has something to predict
    pre_mask = anchor_mask | ((torch.rand(3, 12, generator=g) < 0.4) & maskable)
    xt = torch.where(anchor_mask, MASK_ID, x0)
    return Batch(x0, maskable, prompt_lengths), method.Anchor(t, anchor_mask, xt), pre_mask


def reference_step(model, batch, anchor, pre_mask, phi0, cfg: MemDLMConfig, names):
    """memdlm-method.md section 2.4, line by line."""
    params = dict(model.named_parameters())
    scale = cfg.alpha / cfg.rank
    x0, maskable = batch.x0, batch.maskable

    def forward(x, phi):
        merged = dict(params)
        for name in names:
            merged[f"{name}.weight"] = params[f"{name}.weight"] + scale * (
                phi[f"{name}.B"] @ phi[f"{name}.A"]
            )
        return torch.func.functional_call(model, merged, (x,))

    def ce(logits):  # (B, L) per-token cross-entropy against x0
        return F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")

    n = maskable.sum(1).double()
    phi = {k: v.clone().requires_grad_(True) for k, v in phi0.items()}
    for mask in (pre_mask, anchor.mask):
        x_in = torch.where(mask, MASK_ID, x0)
        rr = mask.sum(1) / n
        inner = (ce(forward(x_in, phi)) * mask / rr[:, None]).sum() / mask.sum()
        grads = torch.autograd.grad(inner, list(phi.values()))
        if cfg.grad_transform == "clip":
            grads = [g * torch.clamp(cfg.inner_clip / (g.norm() + 1e-12), max=1.0) for g in grads]
        else:
            grads = [g / (g.norm() + 1e-12) for g in grads]
        phi = {
            k: (p - cfg.inner_lr * g).detach().requires_grad_(True)
            for (k, p), g in zip(phi.items(), grads)
        }
    phi = {k: v.detach() for k, v in phi.items()}
    logits = forward(anchor.xt, phi)
    loss = (ce(logits) * anchor.mask / anchor.t[:, None]).sum() / maskable.sum()
    return loss, phi


@pytest.mark.parametrize(
    "cfg",
    [
        MemDLMConfig(rank=4, alpha=8.0, inner_lr=0.1, inner_clip=1.0),  # the paper's values
        MemDLMConfig(rank=4, alpha=8.0, inner_lr=3.0, inner_clip=0.05),  # the clip binds
        MemDLMConfig(rank=2, alpha=8.0, inner_lr=0.3, grad_transform="normalize"),
    ],
    ids=["paper", "clip-binds", "normalize"],
)
def test_memdlm_step_equals_reference_pseudocode(cfg, monkeypatch):
    model = tiny_model()
    batch, anchor, pre_mask = fixed_batch()
    monkeypatch.setattr(traj, "trajectory_masks", lambda *args: [pre_mask, anchor.mask])
    mem = method.make_fast_weights(model, cfg)
    assert mem.targets == (
        "layers.1.mlp.gate_proj",
        "layers.1.mlp.up_proj",
        "layers.1.mlp.down_proj",
    )

    generator = torch.Generator().manual_seed(11)
    out = memdlm_step(model, mem, batch, anchor, cfg, generator=generator, log_gap=True)
    out.loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    phi0 = mem.init(generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    mem.remove()
    ref_loss, _ = reference_step(model, batch, anchor, pre_mask, phi0, cfg, mem.targets)
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-9, atol=1e-12, msg=name)
    # The inner loop moved the fast weights enough to change the loss: the test is not vacuous.
    assert abs(out.metrics["gap"]) > 1e-6
    assert out.metrics["loss_off"] == pytest.approx(
        method.outer_loss(model(anchor.xt), batch, anchor).item(), rel=1e-12
    )


def test_inner_loop_is_first_order_and_leaves_no_fast_weight_gradient(monkeypatch):
    cfg = MemDLMConfig(rank=4, alpha=8.0, inner_lr=0.5)
    model = tiny_model()
    batch, anchor, pre_mask = fixed_batch()
    monkeypatch.setattr(traj, "trajectory_masks", lambda *args: [pre_mask, anchor.mask])
    mem = method.make_fast_weights(model, cfg)
    captured = {}
    real_solve = method.solve_inner

    def spy(*args, **kwargs):
        captured["phi"], captured["info"] = real_solve(*args, **kwargs)
        return captured["phi"], captured["info"]

    monkeypatch.setattr(method_inner, "solve_inner", spy)
    out = memdlm_step(
        model, mem, batch, anchor, cfg, generator=torch.Generator().manual_seed(0), log_gap=False
    )
    phi = captured["phi"]
    assert all(v.grad_fn is None and not v.requires_grad for v in phi.values())
    # A first step on B (A's gradient is zero while B = 0) then a step on both.
    assert captured["info"].grad_norm[0] > 0
    # The outer gradient is the plain gradient of L(theta, phi_2) with phi_2 constant.
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    start = method.first_fast_layer(adapter(model), cfg)
    with mem.bind(phi):
        direct = method.outer_loss(
            model.logits_from(model.hidden_states(anchor.xt, upto=start), start=start),
            batch,
            anchor,
        )
    direct.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-12, atol=1e-14)
    mem.remove()


def test_prompt_adaptation_masks_only_the_prompt_and_is_per_prompt():
    cfg = MemDLMConfig(rank=2, alpha=4.0, inner_lr=0.5)
    model = tiny_model()
    mem = method.make_fast_weights(model, cfg)
    prompt = torch.randint(0, MASK_ID, (3, 10), generator=torch.Generator().manual_seed(5))
    phi = method.adapt_to_prompt(
        model, mem, prompt, cfg, mask_id=MASK_ID, generator=torch.Generator().manual_seed(1)
    )
    assert all(v.shape[0] == 3 for v in phi.values())  # one set of fast weights per prompt
    # Row 0 adapted alone equals row 0 of the batch: prompts do not share memory.
    # (Same generator draws for row 0 are not guaranteed, so compare through a changed row 2.)
    other = prompt.clone()
    other[2] = (other[2] + 1) % MASK_ID
    phi_other = method.adapt_to_prompt(
        model, mem, other, cfg, mask_id=MASK_ID, generator=torch.Generator().manual_seed(1)
    )
    for key in phi:
        torch.testing.assert_close(phi[key][:2], phi_other[key][:2], rtol=0, atol=0)
        assert not torch.equal(phi[key][2], phi_other[key][2]) or key.endswith(".A")
    mem.remove()


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factor = cosine_with_warmup(100, 0.1, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(99) == pytest.approx(0.1, abs=2e-3)
    values = [factor(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_the_prompt_is_never_masked_by_the_anchor_or_the_inner_states():
    rows = [
        Encoded(tuple(range(1, 1 + p)), tuple(range(1, 1 + r)) + (12,))
        for p, r in [(3, 9), (7, 2), (1, 11), (10, 1)]
    ]
    batch = collate(rows, eos_id=12)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        anchor = method.sample_anchor(batch, mask_id=MASK_ID, eps=1e-3, generator=g)
        prompt = ~batch.maskable
        assert not (anchor.mask & prompt).any()
        assert torch.equal(anchor.xt[prompt], batch.x0[prompt])
        for state in method.trajectory_masks(anchor.mask, batch.maskable, MemDLMConfig(), g):
            assert not (state & prompt).any()


def test_split_point_is_mid_layer_only_when_the_layer_may_be_split():
    model = tiny_model()
    backbone = adapter(model)
    ffn = method.make_fast_weights(model, MemDLMConfig(rank=2, alpha=4.0))
    assert method.split_point(backbone, ffn.targets, MemDLMConfig()) == method.Split(
        backbone, 1, mid=True
    )
    ffn.remove()
    attention = MemDLMConfig(rank=2, alpha=4.0, targets=["q_proj", "gate_proj"])
    mem = method.make_fast_weights(model, attention)
    assert method.split_point(backbone, mem.targets, attention) == method.Split(backbone, 1)
    mem.remove()
    handle = model.layers[1].register_forward_pre_hook(lambda module, args: None)
    mem = method.make_fast_weights(model, MemDLMConfig(rank=2, alpha=4.0))
    assert method.split_point(backbone, mem.targets, MemDLMConfig()) == method.Split(backbone, 1)
    handle.remove()
    mem.remove()


def _loss_and_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return [loss.detach(), *torch.autograd.grad(loss, params, allow_unused=True)]


@pytest.mark.parametrize("per_sample", [False, True])
def test_losses_on_the_scored_rows_equal_the_full_forward(per_sample):
    """With fast weights on the last layer's FFN, everything after the split acts per position,
    so the loss runs it on the scored rows only (`head_loss`); the full forward (Split(0)) is
    the oracle: loss and every gradient, base and fast weights, float64. Per-sample fast
    weights see the rows packed back by sample, (B, M, D) with M the most any row has."""
    model = tiny_model()
    batch, anchor, _ = fixed_batch()
    cfg = MemDLMConfig(rank=2, alpha=4.0)
    mem = method.make_fast_weights(model, cfg)
    phi = mem.init(batch_size=3 if per_sample else None, generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)  # fmt: skip
    phi = {k: (v + 0.1 * torch.randn_like(v)).requires_grad_() for k, v in phi.items()}
    backbone = adapter(model)
    split = method.split_point(backbone, mem.targets, cfg)
    assert split == method.Split(backbone, 1, mid=True) and split.position_wise()
    args = (batch.x0, anchor.mask, anchor.t, batch.maskable)
    seen = []
    hook = model.layers[1].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    whole = method.Split(backbone, 0)
    with mem.bind(phi):
        rows = method.head_loss(split, split.early(anchor.xt), *args, normalize="token",
                                per_sample=per_sample)  # fmt: skip
        full = method.head_loss(whole, whole.early(anchor.xt), *args, normalize="token",
                                per_sample=per_sample)  # fmt: skip
    hook.remove()
    scored = int(anchor.mask.sum())
    packed = (3, int(anchor.mask.sum(1).max()), 16) if per_sample else (scored, 1, 16)
    assert seen[0] == packed and seen[1] == (3, 12, 16)  # the rows' tail, then the full one
    inputs = [*[p for p in model.parameters()], *phi.values()]
    for a, b in zip(torch.autograd.grad(rows, inputs), torch.autograd.grad(full, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(rows, full, rtol=1e-12, atol=0)
    mem.remove()


def test_standard_loss_runs_the_last_ffn_on_the_masked_rows_with_the_full_result():
    model = tiny_model()
    batch, anchor, _ = fixed_batch()
    calls = []
    model.layers[1].mlp.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    backbone = adapter(model)
    loss = method.standard_loss(backbone, batch, anchor)
    assert calls == [(int(anchor.mask.sum()), 1, 16)]  # the masked rows, one position each
    whole = method.Split(backbone, 0)
    full = method.head_loss(whole, whole.early(anchor.xt), batch.x0, anchor.mask, anchor.t,
                            batch.maskable, normalize="token")  # fmt: skip
    grads = torch.autograd.grad(loss, list(model.parameters()))
    oracle = torch.autograd.grad(full, list(model.parameters()))
    torch.testing.assert_close(loss, full, rtol=1e-12, atol=0)
    for a, b in zip(grads, oracle):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_the_first_fast_layer_is_memorys_rule_everywhere():
    """One rule (`memory.first_of_last_layers`) for the split, the backbone line, the Hugging Face
    adapter and the memory estimate, the clamp included (a fraction whose 1 - f rounds to 1)."""
    from recipes.memdlm.backbones import adapter
    from recipes.memdlm.backbones.hf.attention import first_fast_index
    from recipes.memdlm.estimate import SHAPES

    model, shape = tiny_model(), SHAPES[0]
    for fraction in (1e-17, 0.1, 0.5, 1.0):
        first = method.first_fast_layer(adapter(model), MemDLMConfig(layer_fraction=fraction))
        assert first == min(int(2 * (1 - fraction)), 1) == first_fast_index(2, fraction)
        line = adapter(model).describe(fraction, ["up_proj"])
        assert line["forward"] == f"split at layer {first}"
        assert line["fast_weight_layers"] == list(range(first, 2))
        assert shape.fast_layers(fraction) == shape.layers - first_fast_index(
            shape.layers, fraction
        )


def test_the_final_inner_gradient_norm_is_the_last_inner_steps_for_any_k():
    """`inner_grad_norm_final` is the last inner step's norm (not the largest of the first two),
    whatever the number of inner steps."""
    for norms in ([0.5], [3.0, 1.0], [1.0, 4.0, 2.0], [9.0, 8.0, 7.0, 0.25]):
        k = len(norms)
        record = method.step_record(1.0, None, [0.1] * k, norms, [0.0] * k)
        assert record["inner_grad_norm_final"] == norms[-1]
        assert [record[f"inner_grad_norm_{i + 1}"] for i in range(k)] == norms
    assert "inner_grad_norm_final" not in method.step_record(1.0, None, [], [], [])


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_the_first_inner_step_at_init_gives_the_ordinary_paths_phi_bit_for_bit(
    per_sample, monkeypatch
):
    """The first inner state binds phi_0 with `at_init` (LoRA B = 0: the correction's forward
    and A's gradient are skipped); the adapted phi and the inner record are those of the
    ordinary path, exactly."""
    cfg = MemDLMConfig(rank=4, alpha=8.0, inner_lr=0.5, per_sample=per_sample)
    model = tiny_model()
    batch, anchor, pre_mask = fixed_batch()
    monkeypatch.setattr(traj, "trajectory_masks", lambda *args: [pre_mask, anchor.mask])
    backbone = adapter(model)
    memdlm = method.MemDLM.on(backbone, cfg, mask_id=MASK_ID)
    draws = memdlm.draw_after(batch, anchor, torch.Generator().manual_seed(4))
    problem = memdlm.problem(backbone, batch)
    states = method_inner.inner_states(problem, draws, mask_id=MASK_ID)
    assert [s.at_init for s in states] == [True, False]
    results, matmuls = [], []
    for first_at_init in (True, False):
        states[0].at_init = first_at_init
        with CountMatmuls() as counter:
            results.append(method_inner.solve_inner(problem, states, draws.phi0, memdlm.optimizer))
        matmuls.append(counter.count)
    (phi, info), (ordinary_phi, ordinary_info) = results
    # The inner loss passes the flag on. Skipped in the first step, per LoRA target: B's forward
    # product, g B and A's gradient; for down_proj also its input's gradient through A (that
    # input depends on gate/up's fast weights; gate/up's input, the detached hidden rows, not).
    assert len(memdlm.mem.targets) == 3
    assert matmuls[1] - matmuls[0] == 3 + 3 + 4
    assert all(torch.equal(phi[k], ordinary_phi[k]) for k in phi)
    assert torch.equal(info.loss, ordinary_info.loss)
    assert torch.equal(info.grad_norm, ordinary_info.grad_norm)
    assert all(torch.count_nonzero(phi[k]) > 0 for k in phi if k.endswith(".B"))  # it moved
    memdlm.close()
