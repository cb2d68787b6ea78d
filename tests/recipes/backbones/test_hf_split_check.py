"""The split-forward check of `HFDenoiser` (backbones/hf/denoiser.py): a model the hooks cannot
drive falls back to full forwards and says so in the backbone line and in the facts that
summary.json keeps; any other exception during the check propagates."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

from recipes.memdlm.backbones import hf  # noqa: E402
from recipes.memdlm.build import announce  # noqa: E402
from recipes.memdlm.config import build_config  # noqa: E402


def tiny_bert(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForMaskedLM(config).eval()


def with_encoder_check(model, check) -> torch.nn.Module:
    """`model` whose encoder first runs `check(encoder)`: a stand-in for a family whose code
    does something with its layer stack that the split forward's shortened stack upsets."""
    encoder = model.bert.encoder
    original = encoder.forward

    def forward(*args, **kwargs):
        check(encoder)
        return original(*args, **kwargs)

    encoder.forward = forward
    return model


class Notes:
    def __init__(self):
        self.notes = []

    def note(self, message):
        self.notes.append(message)


def announced(model) -> tuple[list[str], dict]:
    cfg = build_config("smoke", overrides={"memdlm": {"layer_fraction": 0.5}})
    reporter = Notes()
    return reporter.notes, announce(model, cfg, reporter)


def test_a_model_the_hooks_drive_gets_the_verified_split():
    model = hf.wrap(tiny_bert(), layer_fraction=0.5)
    assert model.split, model.split_note
    notes, facts = announced(model)
    assert facts["split"] is True and "checked against the full forward" in facts["split_note"]
    assert "split at layer 1" in notes[0]


def test_a_model_that_indexes_its_layer_stack_falls_back_and_says_so():
    def absolute(encoder):  # the last layer by absolute index, as some remote code does
        encoder.layer[encoder.config.num_hidden_layers - 1]

    model = hf.wrap(with_encoder_check(tiny_bert(), absolute), layer_fraction=0.5)
    assert not model.split
    assert model.split_note.startswith("the split forward raised IndexError")
    notes, facts = announced(model)
    assert facts["split"] is False and facts["split_note"] == model.split_note
    assert f"full forward ({model.split_note})" in notes[0]  # the printed backbone line
    x = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the fallback is the full forward itself
        assert torch.equal(model.logits_from(model.hidden_states(x, upto=1), start=1), model(x))


def test_a_model_whose_layers_are_never_called_through_their_hooks_falls_back():
    model = tiny_bert()
    encoder = model.bert.encoder
    outputs = transformers.modeling_outputs.BaseModelOutputWithPastAndCrossAttentions

    def forward(hidden_states, *args, **kwargs):  # layer.forward called directly: no hook fires
        for layer in encoder.layer:
            hidden_states = layer.forward(hidden_states)[0]
        return outputs(last_hidden_state=hidden_states)

    encoder.forward = forward
    model = hf.wrap(model, layer_fraction=0.5)
    assert not model.split and "SplitUnsupported" in model.split_note
    assert "was never called" in model.split_note


def test_any_other_exception_of_the_check_propagates():
    def broken(encoder):
        if len(encoder.layer) < encoder.config.num_hidden_layers:
            raise RuntimeError("a bug in the model code")

    with pytest.raises(RuntimeError, match="a bug in the model code"):
        hf.wrap(with_encoder_check(tiny_bert(), broken), layer_fraction=0.5)
