"""The Backbone interface: `adapter` picks each family's adapter, and each adapter answers the
recipe's questions the way the method needs (fused head, mid-layer split, targets, attention)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffusion as dd
import memory as mm
from recipes.memdlm.backbones import Backbone, FullForward, adapter, describe_line, split_forward
from recipes.memdlm.backbones.generic import GenericBackbone
from recipes.memdlm.backbones.reference import ReferenceBackbone
from recipes.memdlm.config import ConfigError, MemDLMConfig, build_config
from recipes.memdlm.method import Split, make_fast_weights, split_point

FFN = ("gate_proj", "up_proj", "down_proj")


def reference(n_layers: int = 4) -> dd.Transformer:
    torch.manual_seed(0)
    return dd.Transformer(20, d_model=16, n_layers=n_layers, n_heads=2, d_ff=32, max_seq_len=32)


class Plain(nn.Module):
    """A tokens -> logits module with a `layers` stack but no split forward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"up_proj": nn.Linear(8, 8), "down_proj": nn.Linear(8, 8)})
            for _ in range(4)
        )
        self.head = nn.Linear(8, 20)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer["down_proj"](torch.tanh(layer["up_proj"](h)))
        return self.head(h)


def test_adapter_picks_the_family_and_every_adapter_is_a_backbone():
    assert isinstance(adapter(reference()), ReferenceBackbone)
    assert isinstance(adapter(Plain()), GenericBackbone)
    assert isinstance(adapter(FullForward(Plain())), GenericBackbone)
    for model in (reference(), Plain()):
        assert isinstance(adapter(model), Backbone)


def test_split_forward_is_the_model_itself_or_its_full_forward_view():
    ref, plain = reference(), Plain()
    assert split_forward(ref) is ref
    view = split_forward(plain)
    assert isinstance(view, FullForward)
    x = torch.randint(0, 19, (2, 6))
    torch.testing.assert_close(view.logits_from(view.hidden_states(x, upto=3), start=3), plain(x))


def test_reference_targets_follow_the_last_layers_rule():
    model = reference(n_layers=10)
    got = adapter(model).fast_weight_targets(0.2, FFN)
    assert got == tuple(mm.last_layers(model, fraction=0.2, modules=FFN))
    assert {name.split(".")[1] for name in got} == {"8", "9"}


def test_fused_head_is_offered_only_for_a_hook_free_bias_free_head():
    model = reference()
    backbone = adapter(model)
    assert backbone.head_weight("auto") is model.lm_head.weight
    assert backbone.head_weight(None) is None
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: None)
    assert backbone.head_weight("auto") is None  # a hook must see the head's own call
    handle.remove()
    assert backbone.head_weight("auto") is model.lm_head.weight


def test_mid_layer_split_only_when_the_first_fast_layer_has_ffn_targets_only():
    model = reference(n_layers=4)
    cfg = MemDLMConfig(layer_fraction=0.5)
    mem = make_fast_weights(model, cfg)
    try:
        backbone = adapter(model)
        assert split_point(backbone, mem.targets, cfg) == Split(backbone, 2, mid=True)
    finally:
        mem.remove()
    attention_too = ("layers.2.attn.qkv", "layers.2.mlp.up_proj")
    assert not adapter(model).can_split_mid_layer(2, attention_too)
    hook = model.layers[2].register_forward_hook(lambda *args: None)
    assert not adapter(model).can_split_mid_layer(2, ("layers.2.mlp.up_proj",))
    hook.remove()


def test_generic_backbone_has_no_split_and_no_fused_head():
    backbone = adapter(Plain())
    assert backbone.head_weight("auto") is None
    assert not backbone.can_split_mid_layer(0, ())
    assert not backbone.uses_every_parameter()
    assert backbone.fast_weight_targets(0.5, ("up_proj",)) == (
        "layers.2.up_proj",
        "layers.3.up_proj",
    )


def test_a_module_without_layers_gets_a_clear_type_error():
    with pytest.raises(TypeError, match="no `layers` stack"):
        adapter(nn.Linear(3, 3)).fast_weight_targets(0.1, FFN)


def test_describe_says_family_forward_path_and_where_the_fast_weights_are():
    info = adapter(reference(n_layers=10)).describe(0.2, FFN)
    assert info["forward"] == "split at layer 8"
    assert (info["fast_weight_modules"], info["fast_weight_layers"]) == (6, [8, 9])
    line = describe_line(info)
    assert "reference" in line and "split at layer 8" in line and "6 fast-weight modules" in line
    generic = describe_line(adapter(Plain()).describe(0.5, ("up_proj",)))
    assert "full forward" in generic and "2 fast-weight modules in layers [2, 3]" in generic


def test_block_causal_sampling_is_refused_where_the_family_cannot_do_it():
    with adapter(reference()).sampling_attention("bidirectional", 32):
        pass
    with pytest.raises(ValueError, match="block_causal"):
        adapter(reference()).sampling_attention("block_causal", 32)
    with pytest.raises(ConfigError, match="sample_attention"):
        build_config("smoke", overrides={"model": {"sample_attention": "block_causal"}})


def test_what_fsdp_and_the_harness_ask_of_each_backbone():
    ref, plain = reference(), Plain()
    assert adapter(ref).split_methods() == ("hidden_states", "logits_from", "features_from")
    assert all(callable(getattr(ref, name)) for name in adapter(ref).split_methods())
    assert adapter(ref).output_head() is ref.lm_head
    assert adapter(plain).split_methods() == () and adapter(plain).output_head() is None
    assert adapter(ref).max_positions() == ref.max_seq_len  # the trained length (rotary tables)
    assert adapter(plain).max_positions() is None


def test_only_the_last_layers_ffn_and_the_final_norm_count_as_position_wise():
    ref = adapter(reference(n_layers=3))
    assert ref.position_wise_after(2, True)  # last layer's FFN, then the norm
    assert not ref.position_wise_after(2, False)  # its attention mixes positions
    assert not ref.position_wise_after(1, True)  # a later layer's attention does
    assert not adapter(Plain()).position_wise_after(3, True)
    # Per position means per position: rows taken from anywhere give the same features.
    h = torch.randn(2, 5, 16)
    split = Split(adapter(reference(n_layers=3)), 2, mid=True)
    rows, full = split.row_features(h.reshape(10, 16)), split.features(h)
    torch.testing.assert_close(rows, full.reshape(10, 16), rtol=1e-6, atol=1e-6)
