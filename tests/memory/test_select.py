"""Target selection: MemDLM's last-layers rule and regex selection over module names."""

from __future__ import annotations

import re

import pytest
from torch import nn

import memory as mm
from tests.memory.helpers import tiny_model

FFN = ("gate_proj", "up_proj", "down_proj")


def ffn_names(layers, prefix="layers"):
    return [f"{prefix}.{i}.mlp.{m}" for i in layers for m in FFN]


class Stack(nn.Module):
    """num_layers blocks, each holding an `mlp` with the three FFN projections."""

    def __init__(self, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"mlp": nn.ModuleDict({m: nn.Linear(2, 2) for m in FFN})})
            for _ in range(num_layers)
        )


@pytest.mark.parametrize(
    ("num_layers", "fraction", "first"),
    [
        (20, 0.1, 18),  # LLaDA2.1-mini: layers 18-19
        (16, 0.1, 14),  # int(14.4) = 14
        (4, 0.1, 3),  # int(3.6) = 3: one layer
        (4, 0.5, 2),
        (4, 1.0, 0),
        (1, 0.1, 0),
        (10, 1e-12, 9),
        (10, 1e-17, 9),  # 1 - f rounds to 1.0: int(L * (1 - f)) = L, clamped to keep one
        (7, 0.3, 4),  # int(4.9) = 4
    ],
)
def test_last_layers_follows_the_reference_rule(num_layers, fraction, first):
    names = mm.last_layers(Stack(num_layers), fraction)
    assert names == ffn_names(range(first, num_layers))
    assert mm.first_of_last_layers(num_layers, fraction) == first


def test_last_layers_on_the_reference_transformer_defaults_to_ffn_of_the_last_layer():
    model = tiny_model(num_layers=4)
    assert mm.last_layers(model) == ffn_names([3])
    assert mm.last_layers(model, 0.5, modules=("q_proj",)) == [
        "layers.2.attn.q_proj",
        "layers.3.attn.q_proj",
    ]
    for name in mm.last_layers(model, 1.0):
        assert isinstance(model.get_submodule(name), nn.Linear)


def test_last_layers_includes_moe_experts_and_follows_a_nested_layer_path():
    expert = lambda: nn.ModuleDict({m: nn.Linear(2, 2) for m in FFN})  # noqa: E731
    layer = nn.ModuleDict({"mlp": nn.ModuleDict({"experts": nn.ModuleList([expert(), expert()])})})
    hf_like = nn.Module()
    hf_like.model = nn.Module()
    hf_like.model.layers = nn.ModuleList([layer])
    names = mm.last_layers(hf_like, layers="model.layers")
    assert names == [f"model.layers.0.mlp.experts.{e}.{m}" for e in (0, 1) for m in FFN]


def test_last_layers_rejects_bad_arguments():
    model = Stack(4)
    for fraction in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            mm.last_layers(model, fraction)
    with pytest.raises(TypeError, match="fraction"):
        mm.last_layers(model, "0.1")
    with pytest.raises(TypeError, match="modules"):
        mm.last_layers(model, modules="gate_proj")
    with pytest.raises(ValueError, match="modules"):
        mm.last_layers(model, modules=())
    with pytest.raises(ValueError, match="dwn_proj"):  # a typo is an error, not a no-op
        mm.last_layers(model, modules=("gate_proj", "dwn_proj"))
    with pytest.raises(ValueError, match="no submodule 'layers'"):
        mm.last_layers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ModuleList"):
        mm.last_layers(model, layers="layers.0")
    with pytest.raises(ValueError, match="empty"):
        mm.last_layers(Stack(0))
    with pytest.raises(TypeError, match="model"):
        mm.last_layers("model")


def test_select_fullmatches_linear_names():
    model = tiny_model(num_layers=4)
    pattern = r"layers\.[23]\.mlp\.(gate|up|down)_proj"
    assert mm.select(model, pattern) == ffn_names([2, 3])
    assert mm.select(model, re.compile(r"layers\.0\.attn\.[qk]_proj")) == [
        "layers.0.attn.q_proj",
        "layers.0.attn.k_proj",
    ]
    # "layers.1.mlp" is a container: fully matched but skipped; only linears come back.
    assert mm.select(model, r"layers\.1\.mlp(\.down_proj)?") == ["layers.1.mlp.down_proj"]


def test_select_rejects_bad_patterns():
    model = tiny_model()
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        mm.select(model, "mlp")  # a substring, not a full name
    with pytest.raises(ValueError, match="not a valid regex"):
        mm.select(model, "layers.(")
    with pytest.raises(TypeError, match="pattern"):
        mm.select(model, 3)
    with pytest.raises(TypeError, match="model"):
        mm.select("model", "x")
