"""The scored-rows tail of Hugging Face backbones (`backbones/hf/tail.py`), proven per family.

Each family's last layer is claimed to end, after its attention, in computation that acts on each
position alone (its FFN or MoE block, the final norm, the head). Checked here in float64 on the
stand-ins of the real remote code and on transformers' own Llama and Qwen2-MoE: the tail run on
rows taken from anywhere in the batch equals the full forward at those rows, and a MemDLM step
(inner losses, outer loss, diagnostic, every gradient) equals the one that runs the full tail.
A model whose tail mixes positions, or whose head is not a plain projection, fails the probe at
wrap time and keeps the full tail.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import replace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from recipes.memdlm import method  # noqa: E402
from recipes.memdlm.backbones import adapter, hf  # noqa: E402
from recipes.memdlm.config import build_config  # noqa: E402
from recipes.memdlm.data.batches import Batch  # noqa: E402
from tests.memory.test_at_init import CountMatmuls  # noqa: E402
from tests.recipes.backbones import standins  # noqa: E402
from tests.recipes.backbones.test_hf import memdlm_losses  # noqa: E402

STANDINS = tuple(standins.FAMILIES)  # llada, llada_moe, llada2, dream, llada21
NATIVE = ("llama", "qwen2_moe")  # transformers' own decoders, made bidirectional
FAMILIES = STANDINS + NATIVE


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tail")
    return {name: standins.write(name, root / name) for name in STANDINS}


def native(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
    )  # fmt: skip
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    config = transformers.Qwen2MoeConfig(
        **common, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    return transformers.Qwen2MoeForCausalLM(config)  # a MoE last layer, shared expert gated


def loaded(folders, name: str) -> hf.HFDenoiser:
    """The family wrapped as the recipe wraps it (fast weights on the last half of the layers),
    in float64 (the probe ran in float32 at wrap time)."""
    if name in NATIVE:
        model = hf.wrap(native(name), layer_fraction=0.5)
    else:
        cfg = build_config(
            "smoke",
            overrides={
                "model": {"path": str(folders[name]), "trust_remote_code": True},
                "memdlm": {"layer_fraction": 0.5},
            },
        )
        model = hf.load_model(cfg, device="cpu")
    return model.double()


def rounding(dtype: torch.dtype) -> dict[str, float]:
    """Tolerance of a float64 computation seen in `dtype`: LLaDA2.x rounds its logits to
    float32 even in a float64 model (llada-family-backbones.md section 4), the tail does not."""
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12}
    return {"rtol": 3e-7, "atol": 1e-7}


def vocab(model: hf.HFDenoiser) -> int:
    return model.hf.get_input_embeddings().num_embeddings


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", FAMILIES)
def test_the_tail_on_any_rows_equals_the_full_forward(folders, name, training):
    model = loaded(folders, name).train(training)
    assert model.tail_rows, model.tail_note
    last = len(model.layers) - 1
    backbone = adapter(model)
    assert backbone.position_wise_after(last, True)
    assert not backbone.position_wise_after(last, False)  # its attention mixes positions
    assert backbone.head_weight("auto") is not None
    assert model.describe(0.5)["tail"] == "rows"
    x = torch.randint(0, vocab(model) - 1, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x).flatten(0, 1)
        hidden = model.hidden_states(x, upto=last, mid_layer=True)
        every = model.logits_from(hidden, start=last, mid_layer=True).flatten(0, 1)
        rows = torch.randperm(30, generator=torch.Generator().manual_seed(2))[:7]
        alone = model.logits_from(hidden.flatten(0, 1)[rows, None], start=last, mid_layer=True)
    tol = rounding(full.dtype)
    torch.testing.assert_close(every.to(full.dtype), full, **tol)
    torch.testing.assert_close(alone[:, 0].to(full.dtype), full[rows], **tol)
    with torch.no_grad():  # a loss may score no row at all (an empty inner mask)
        none = model.logits_from(hidden.flatten(0, 1)[:0, None], start=last, mid_layer=True)
    assert none.shape == (0, 1, full.shape[-1])
    # features_from at a layer split: the final norm's output, projected by the head's weight
    features = model.features_from(model.hidden_states(x, upto=1), start=1)
    torch.testing.assert_close(model.project(features).flatten(0, 1).to(full.dtype), full, **tol)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_memdlm_step_with_the_scored_rows_tail_equals_the_full_tail(folders, name, per_sample):
    """The inner losses, the outer loss, the diagnostic and every gradient are those of the
    logits path with the full tail (float64). MoE blocks' auxiliary outputs (router logits over
    the rows they see) are never part of the loss: MoE families are covered too."""
    memdlm = {"layer_fraction": 0.1, "inner_lr": 1.0, "per_sample": per_sample}
    cfg = build_config("smoke", overrides={"memdlm": memdlm})  # fast weights: the last FFN
    model = loaded(folders, name)
    last = len(model.layers) - 1
    x0 = torch.randint(0, vocab(model) - 2, (3, 12), generator=torch.Generator().manual_seed(3))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, :4] = False
    mem = method.make_fast_weights(model, cfg.memdlm)
    try:
        backbone = adapter(model)
        split = method.split_point(backbone, mem.targets, cfg.memdlm)
        assert split == method.Split(backbone, last, mid=True)
    finally:
        mem.remove()
    rows_metrics, rows_grads = memdlm_losses(model, cfg, x0, maskable)
    model.tail, model.tail_rows = None, False  # the logits path: full tail, full logits
    full_metrics, full_grads = memdlm_losses(model, cfg, x0, maskable)
    assert rows_metrics["gap"] > 1e-6  # the inner loop does something
    float32_logits = name in ("llada2", "llada21")  # the logits path rounds (`rounding`)
    rel, grad_tol = (1e-6, 1e-5) if float32_logits else (1e-10, 1e-8)
    for key in ("loss", "loss_off", "inner_loss_1", "inner_loss_2"):
        assert rows_metrics[key] == pytest.approx(full_metrics[key], rel=rel), key
    # A routed expert that no scored row reaches gets no gradient at all on the rows; on the
    # full tail it sees only unscored rows, whose loss weight is 0, so its gradient is exactly 0.
    assert rows_grads.keys() <= full_grads.keys()
    for key, grad in full_grads.items():
        if key not in rows_grads:
            assert ".experts." in key and not grad.any(), key
            continue
        torch.testing.assert_close(rows_grads[key], grad, rtol=grad_tol, atol=grad_tol, msg=key)


DENSE = ("llada", "dream", "llama")  # a dense gated FFN last: its base products can be shared


@pytest.mark.parametrize("name", FAMILIES)
def test_the_anchor_rows_share_the_last_ffns_base_products_bit_for_bit(folders, name):
    """The inner step on the anchor, the outer loss and the diagnostic score the same rows
    under phi_1, phi_2 and no fast weights: on a family whose last FFN is a dense gated one
    (proven on the probe: `tail_shared`) they share its entry norm and the base products of
    gate/up (`losses.SharedRows`), 4 products fewer per step; MoE last layers do not share.
    Every loss, phi and the inner record equal the unshared step's bit for bit; the base
    weights' gradients to float64 rounding (their four terms at the FFN's entry are summed in
    another order)."""
    cfg = build_config("smoke", overrides={"memdlm": {"layer_fraction": 0.1, "inner_lr": 1.0}})
    model = loaded(folders, name)
    assert model.tail_shared == (name in DENSE)
    x0 = torch.randint(0, vocab(model) - 2, (3, 12), generator=torch.Generator().manual_seed(3))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, :4] = False
    batch = Batch(x0, maskable, maskable.long().argmax(1))
    backbone = adapter(model)
    memdlm = method.MemDLM.on(backbone, cfg.memdlm, mask_id=1)
    anchor = method.sample_anchor(batch, mask_id=1, eps=1e-3, generator=torch.Generator())
    draws = memdlm.draw_after(batch, anchor, torch.Generator().manual_seed(4))
    assert draws.anchor_scores_outer
    assert memdlm.shares_anchor_rows(draws) == (name in DENSE)  # asked once, in `MemDLM.on`
    results, matmuls = [], []
    for step_draws in (draws, replace(draws, anchor_scores_outer=False)):
        model.zero_grad()
        with CountMatmuls() as counter:
            loss, parts = memdlm.loss(backbone, step_draws, log_gap=True)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss, parts, grads))
        matmuls.append(counter.count)
    memdlm.close()
    (loss, parts, grads), (loss_u, parts_u, grads_u) = results
    assert matmuls[1] - matmuls[0] == (4 if name in DENSE else 0)
    assert torch.equal(loss, loss_u) and torch.equal(parts.loss_off, parts_u.loss_off)
    assert torch.equal(parts.info.loss, parts_u.info.loss)
    assert torch.equal(parts.info.grad_norm, parts_u.info.grad_norm)
    assert all(torch.equal(parts.phi[k], parts_u.phi[k]) for k in parts.phi)
    assert parts.loss_off - loss > 1e-6  # the inner loop does something
    assert grads.keys() == grads_u.keys()
    for key, grad in grads_u.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-12, atol=1e-15, msg=key)


def test_a_global_module_hook_sees_the_shared_ffns_linears_and_changes_nothing(folders):
    """A global module hook (`register_module_forward_hook`, as `FlopCounterMode` installs)
    must see every module call: the step that shares the last FFN's start then calls gate/up
    itself (`mm.output_of` does), so the hook sees them, and the losses and phi are the ones
    without the hook bit for bit. Under `FlopCounterMode` the step runs and counts."""
    from torch.utils.flop_counter import FlopCounterMode

    model = loaded(folders, "llama")
    assert model.tail_shared
    cfg = build_config("smoke", overrides={"memdlm": {"layer_fraction": 0.1, "inner_lr": 1.0}})
    x0 = torch.randint(0, vocab(model) - 2, (3, 12), generator=torch.Generator().manual_seed(3))
    batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
    backbone = adapter(model)
    memdlm = method.MemDLM.on(backbone, cfg.memdlm, mask_id=1)
    anchor = method.sample_anchor(batch, mask_id=1, eps=1e-3, generator=torch.Generator())
    draws = memdlm.draw_after(batch, anchor, torch.Generator().manual_seed(4))
    assert memdlm.shares_anchor_rows(draws)
    plain_loss, plain = memdlm.loss(backbone, draws, log_gap=True)
    gate = model.layers[len(model.layers) - 1].mlp.gate_proj
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: calls.append(module) if module is gate else None
    )
    try:
        loss, parts = memdlm.loss(backbone, draws, log_gap=True)
    finally:
        handle.remove()
    # the inner steps on the pre-anchor state and on the anchor, the outer loss, the diagnostic
    assert len(calls) == 4
    assert torch.equal(loss, plain_loss) and torch.equal(parts.loss_off, plain.loss_off)
    assert all(torch.equal(parts.phi[k], plain.phi[k]) for k in plain.phi)
    with FlopCounterMode(display=False) as counter:
        loss, parts = memdlm.loss(backbone, draws, log_gap=True)
        loss.backward()
    memdlm.close()
    assert counter.get_total_flops() > 0
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=0)
    for k in plain.phi:  # the mode's dispatch may sum in another order: float64 rounding
        torch.testing.assert_close(parts.phi[k], plain.phi[k], rtol=1e-12, atol=1e-15)


def test_an_ffn_that_is_not_the_gated_form_keeps_its_own_module():
    """A last FFN with gate/up/down_proj whose forward computes something else than
    down(act(gate(x)) * up(x)) is still position-wise (the rows tail holds) but fails the
    shared-products probe, so its module keeps computing it."""
    model = native("llama")
    mlp = model.model.layers[-1].mlp
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) / 2)
    wrapped = hf.wrap(model, layer_fraction=0.5)
    assert wrapped.tail_rows and not wrapped.tail_shared
    last = len(wrapped.layers) - 1
    assert not adapter(wrapped).shares_ffn(last, True)
    assert adapter(hf.wrap(native("llama"), layer_fraction=0.5)).shares_ffn(last, True)


def test_an_ffn_the_shared_start_cannot_drive_keeps_the_rows_tail(monkeypatch):
    """A last FFN whose shared computation raises (a layout with the expected names but other
    modules behind them) turns sharing off, not the proven scored-rows tail."""

    def fails(denoiser, probe):
        raise AttributeError("'LlamaMLP' object has no attribute 'act_fn'")

    monkeypatch.setattr(hf.tail, "prove_shared_ffn", fails)
    wrapped = hf.wrap(native("llama"), layer_fraction=0.5)
    assert wrapped.tail_rows and wrapped.tail is not None and not wrapped.tail_shared
    assert wrapped.tail_note.startswith("the last layer's FFN, final norm and head checked")


def test_an_outer_peft_lora_on_the_ffn_keeps_its_modules(folders):
    """With the outer LoRA (real peft, `model.lora_rank`) the FFN's linears are peft layers
    whose own forward adds the adapter: the dense family that shares without it does not share,
    and its MemDLM step still runs through the modules."""
    pytest.importorskip("peft")
    shares = {}
    for rank in (0, 4):
        model_cfg = {"path": str(folders["llada"]), "trust_remote_code": True, "lora_rank": rank}
        overrides = {"model": model_cfg, "memdlm": {"layer_fraction": 0.1}}
        cfg = build_config("smoke", overrides=overrides)
        model = hf.load_model(cfg, device="cpu")
        memdlm = method.MemDLM.on(adapter(model), cfg.memdlm, mask_id=1)
        shares[rank] = memdlm.shares_ffn
        x0 = torch.randint(2, vocab(model), (2, 12), generator=torch.Generator().manual_seed(5))
        batch = Batch(x0, torch.ones_like(x0, dtype=torch.bool), torch.zeros(2, dtype=torch.long))
        anchor = method.sample_anchor(batch, mask_id=1, eps=1e-3, generator=torch.Generator())
        draws = memdlm.draw_after(batch, anchor, torch.Generator().manual_seed(6))
        loss, _ = memdlm.loss(adapter(model), draws, log_gap=True)
        loss.backward()
        assert torch.isfinite(loss)
        memdlm.close()
    assert shares == {0: True, 4: False}


def test_a_tail_that_mixes_positions_fails_the_probe_and_keeps_the_full_tail():
    """A last FFN whose output depends on other rows (as MoE capacity, where tokens compete for
    an expert's slots, would make it) is found out on the probe's subset of rows."""
    model = native("llama")
    mlp = model.model.layers[-1].mlp
    own = mlp.forward
    mlp.forward = lambda h: own(h) + h.mean(dim=(0, 1), keepdim=True)
    wrapped = hf.wrap(model, layer_fraction=0.5)
    assert wrapped.split and wrapped.tail is not None and not wrapped.tail_rows
    assert "subset of the rows" in wrapped.tail_note
    backbone = adapter(wrapped)
    last = len(wrapped.layers) - 1
    assert not backbone.position_wise_after(last, True)
    assert not backbone.can_split_mid_layer(last, ())
    assert wrapped.describe(0.1)["tail"] == "head"
    assert "scored rows" not in wrapped.description(0.1)


def test_a_head_that_is_not_a_plain_projection_keeps_the_logits_path():
    """Scaled logits (as some families' `logit_scale`) are not W_head times the final norm's
    output: the probe refuses the fused head, and with it the scored-rows tail."""
    model = native("llama")
    head = model.lm_head
    own = head.forward
    head.forward = lambda h: 0.5 * own(h)
    wrapped = hf.wrap(model, layer_fraction=0.5)
    assert wrapped.tail is None and not wrapped.tail_rows
    assert "not the logits" in wrapped.tail_note
    backbone = adapter(wrapped)
    assert backbone.head_weight("auto") is None and backbone.output_head() is None
    assert wrapped.describe(0.5)["tail"] == "none"


def test_fast_weights_in_the_attention_keep_the_split_between_layers():
    model = hf.wrap(native("llama"), layer_fraction=0.5)
    backbone, last = adapter(model), len(model.layers) - 1
    assert "after layer 3's attention, the scored rows only" in model.description(0.1)
    assert "scored rows" not in model.description(0.5)  # fast weights from layer 2 on
    assert backbone.can_split_mid_layer(last, (f"hf.model.layers.{last}.mlp.up_proj",))
    assert not backbone.can_split_mid_layer(last, (f"hf.model.layers.{last}.self_attn.q_proj",))
    assert not backbone.can_split_mid_layer(last - 1, ())  # only the last layer's tail is proven
