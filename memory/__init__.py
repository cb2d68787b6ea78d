"""memory: parametric fast weights (LoRA and full-matrix) that attach to any model.

import memory as mm
mem = mm.FastLoRA(model, mm.last_layers(model), rank=32, alpha=64.0)
state = mem.init(batch_size=None)          # dict[str, Tensor]
with mem.bind(state):                      # hooks on for the block only
    logits = model(x)                      # W x + (alpha/rank) B A x at every target
"""

from memory.fast_weights import (
    Binding,
    FastWeights,
    bindings,
    one_sample,
    only_fast_weights,
    output_of,
    per_sample_size,
)
from memory.full import FullFastWeights
from memory.lora import FastLoRA
from memory.select import first_of_last_layers, last_layers, select
from memory.state import clone, detach

__all__ = [
    "Binding",
    "FastLoRA",
    "FastWeights",
    "FullFastWeights",
    "bindings",
    "clone",
    "detach",
    "first_of_last_layers",
    "last_layers",
    "one_sample",
    "only_fast_weights",
    "output_of",
    "per_sample_size",
    "select",
]
