"""Full-matrix fast weights: a dense delta added to each target weight.

At every target linear the model computes y = (W + delta) x + b with delta (out, in) from
the bound state, zero at `init`. This is MemDLM's "full" inner adapter (`InnerFullLinear`,
the Fig. 7 "Full Param." ablation) and the classic fast-weight matrix of Schmidhuber (1992):
with keys k and values v, one SGD step on 0.5 ||(W + delta) k - v||^2 is the delta rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memory.at_init import AtInit
from memory.fast_weights import FastWeights, batched_linear


class FullFastWeights(FastWeights):
    """Dense fast weights on the named `nn.Linear` submodules of `model`.

    `FullFastWeights(model, targets)`: `model` is any `nn.Module` (hooked, not modified) and
    `targets` the full dotted names of `nn.Linear` submodules. State key per target:
    `"<target>.delta"` of shape (out, in), with an optional leading batch dim for per-sample
    fast weights. Same interface as `FastLoRA`.
    """

    _suffixes = ("delta",)

    def _param_shapes(self, linear: nn.Linear):
        return ((linear.out_features, linear.in_features),)

    def _init_state(self, targets, batch, generator):
        del generator  # deterministic: every delta starts at zero
        return [
            (torch.zeros(batch + self._param_shapes(t.linear)[0], device=t.device, dtype=t.dtype),)
            for t in targets
        ]

    def _output_delta(self, linear, x, params):
        (delta,) = params
        return F.linear(x, delta) if delta.dim() == 2 else batched_linear(x, delta)

    def _output_at_init(self, linear, x, params, output):
        """At delta = 0 the output is the base's; delta's gradient needs only x
        (`memory.at_init`)."""
        (delta,) = params
        return AtInit.apply(output, x, delta)

    def _weight_delta(self, params):
        (delta,) = params
        return delta
