"""Model families behind one interface (`Backbone`, base.py): one adapter module per family.

`adapter(model)` is the only place that looks at a model's type; everything above the model asks
its questions through the `Backbone` it returns, the split forward included. `build.py` (above
this package) builds the run's model from the configuration. Adding a family: one adapter module
implementing `Backbone` (and, if it is loaded from the configuration, a branch in `build.py`),
plus its test.
"""

from __future__ import annotations

import diffusion as dd
from recipes.memdlm.backbones.base import Backbone, describe_line
from recipes.memdlm.backbones.generic import FullForward, GenericBackbone
from recipes.memdlm.backbones.reference import ReferenceBackbone


def adapter(model) -> Backbone:
    """The `Backbone` of `model`: the reference Transformer, a wrapped Hugging Face model
    (`hf.HFDenoiser`), or any tokens -> logits module (a full forward). Resolve it once, where
    the model is built or enters (a training phase, an evaluation, the API), and pass it on:
    nothing is kept on the module."""
    return _make_backbone(model)


def resolve(model_or_backbone) -> Backbone:
    """`model_or_backbone` itself when it is a `Backbone` already, else `adapter(model)`: for the
    public entry points that take either."""
    from recipes.memdlm.backbones.hf import HFBackbone

    known = (ReferenceBackbone, GenericBackbone, HFBackbone)
    return model_or_backbone if isinstance(model_or_backbone, known) else adapter(model_or_backbone)


def _make_backbone(model) -> Backbone:
    from recipes.memdlm.backbones.hf import HFBackbone, HFDenoiser

    if isinstance(model, dd.Transformer):
        return ReferenceBackbone(model)
    if isinstance(model, HFDenoiser):
        return HFBackbone(model)
    return GenericBackbone(model)


def split_forward(model):
    """`model` itself when its family has the split forward (`hidden_states` / `logits_from`),
    else a `FullForward` view of it."""
    return FullForward(model) if isinstance(adapter(model), GenericBackbone) else model


__all__ = ["Backbone", "FullForward", "adapter", "describe_line", "resolve", "split_forward"]
