"""Hugging Face backbones for the recipe (optional extra `hf`: transformers, safetensors, peft).

`--model.path FOLDER` replaces the reference Transformer with a local Hugging Face model and its
tokenizer: LLaDA-style masked diffusion models (`model.trust_remote_code=true`), BERT/ModernBERT
masked LMs, or a Llama/Qwen-style decoder whose attention is made bidirectional. `HFDenoiser`
gives any of them the interface the recipe uses (the `Backbone` interface, backbones/base.py):

- `model(x) -> logits` (B, L, V), bidirectional attention;
- `model.layers`: the decoder/encoder layer stack, found in the module tree;
- `hidden_states(x, upto=k)` / `logits_from(h, start=k)`: the split forward that lets the inner
  loop run layers < k once per state without gradient. It drives the model's OWN forward with
  hooks (stop at layer k; resume at layer k with the layer stack cut to layers[k:] and the
  embedding output replaced by h), so it works for remote code it has never seen, and it is
  checked against the full forward when the model is wrapped. If the check fails (a model whose
  layers depend on their index, say), the wrapper falls back to full forwards: `hidden_states`
  returns the tokens and `logits_from` runs the whole model (correct, slower inner loop);
- `fast_weight_targets(fraction, modules)`: the FFN linears of the last `fraction` of layers
  (gate/up/down_proj or the architecture's equivalents; every routed expert of a MoE layer gets
  its own fast LoRA, and `mlp.shared_experts` too, as in the reference code). Experts stored as
  fused 3-D tensors (transformers >= 5) are first rewritten as one `nn.Linear` per projection and
  expert (`UnfusedExperts`), in those layers only.

The LLaDA family's remote code (transformers 4.57 line) is recognised by `config.model_type`
(`detect_family`): each family gets the mask it needs (`MASK_STYLE`: LLaDA2 and causal decoders
always an additive 4-D mask, so no causal mask is ever built; Dream a bool one), Dream's logits
are shifted back so that position i predicts token i, LLaDA2 (and any family taking a 4-D
mask) can sample block-causally (`attention="block_causal"`), and MoE blocks with an
`nn.ModuleList` of experts get the adapter's own dispatch in the fast-weight layers
(`take_over_routing`, checked against the block's own forward): each expert sees its tokens as
(B, n, H) rows grouped by sample, in train and eval mode. `HFDenoiser.describe()` /
`description()` say which path is taken.

The position-wise end of the model (the last layer's FFN or MoE block, the final norm, the head)
is found by the family's layout and proven on a probe against the full forward when the wrapper
is built (`tail.py`): then the fused loss reads the head's weight and the losses run that end on
the scored rows only (`HFBackbone.position_wise_after`); otherwise the logits path, as before.

Outer LoRA (`model.lora_rank > 0`) goes through `peft`; fast weights then sit on the frozen base
projection (`...gate_proj.base_layer`) under the outer LoRA, as in the reference code.
"""

from __future__ import annotations

from recipes.memdlm.backbones.hf.attention import (
    ATTENTION,
    FAMILIES,
    MASK_STYLE,
    additive_mask,
    allowed_keys,
    detect_family,
    find_layer_stack,
    first_fast_index,
    make_bidirectional,
)
from recipes.memdlm.backbones.hf.backbone import HFBackbone, broadcast_state
from recipes.memdlm.backbones.hf.denoiser import HFDenoiser, wrap
from recipes.memdlm.backbones.hf.describe import DEFAULT_FFN, FFN_PATTERN, has_expert_list
from recipes.memdlm.backbones.hf.experts import (
    UnfusedExperts,
    is_fused_experts,
    routed_sum,
    unfuse_experts,
)
from recipes.memdlm.backbones.hf.hooks import SPLIT_FAILURES, SplitUnsupported, StopForward
from recipes.memdlm.backbones.hf.hub import fingerprint, resolve
from recipes.memdlm.backbones.hf.loading import (
    DTYPES,
    MASK_TOKENS,
    HFTokenizer,
    add_outer_lora,
    auto_class,
    load_model,
    load_tokenizer,
    require_transformers,
)
from recipes.memdlm.backbones.hf.peft_adapter import load_adapter
from recipes.memdlm.backbones.hf.routing import (
    Routing,
    find_routing,
    routed_forward,
    take_over_routing,
)

__all__ = [
    "ATTENTION",
    "DEFAULT_FFN",
    "DTYPES",
    "FAMILIES",
    "FFN_PATTERN",
    "HFBackbone",
    "HFDenoiser",
    "HFTokenizer",
    "MASK_STYLE",
    "MASK_TOKENS",
    "Routing",
    "SPLIT_FAILURES",
    "SplitUnsupported",
    "StopForward",
    "UnfusedExperts",
    "add_outer_lora",
    "additive_mask",
    "allowed_keys",
    "auto_class",
    "broadcast_state",
    "detect_family",
    "find_layer_stack",
    "find_routing",
    "fingerprint",
    "first_fast_index",
    "has_expert_list",
    "is_fused_experts",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "make_bidirectional",
    "require_transformers",
    "resolve",
    "routed_forward",
    "routed_sum",
    "take_over_routing",
    "unfuse_experts",
    "wrap",
]
