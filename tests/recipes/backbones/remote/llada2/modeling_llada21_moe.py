"""Stand-in for LLaDA2.1's `modeling_llada21_moe.py`: 2.0's stand-in with what 2.1 changed.

- The MoE block returns `(y, (router_logits (B, L, E), topk_idx (B, L, k)))`: both auxiliary
  outputs keep the (B, L) leading shape (2.0 returns the index flattened, (B L, k)).
- The gate renormalises the chosen sigmoid scores over k with a `+ 1e-20` in the denominator
  and casts them back to the logits' dtype (`type_as`) before `routed_scaling_factor`.
- At the model level every attention implementation (eager too) goes through
  `_prepare_4d_causal_attention_mask_for_sdpa`: None or all-ones masks stay bidirectional, a
  2-D mask with a 0 becomes causal; 4-D masks are handled as in 2.0.
The classes keep 2.0's names, as the real file does; our own code, same structure.
"""

import torch
import torch.nn.functional as F
from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask_for_sdpa

from .configuration_llada21_moe import LLaDA2MoeConfig
from .modeling_llada2_moe import LLaDA2MoeDecoderLayer as _Layer20
from .modeling_llada2_moe import LLaDA2MoeGate as _Gate20
from .modeling_llada2_moe import LLaDA2MoeModel as _Model20
from .modeling_llada2_moe import LLaDA2MoeModelLM as _ModelLM20
from .modeling_llada2_moe import LLaDA2MoeSparseMoeBlock as _Block20


class LLaDA2MoeGate(_Gate20):
    def forward(self, hidden_states):
        flat = hidden_states.view(-1, hidden_states.shape[-1])
        logits = F.linear(flat.float(), self.weight.float())
        scores = torch.sigmoid(logits.float()).type_as(logits)
        choice = scores + self.expert_bias  # selection only
        tokens, experts = choice.shape
        groups = choice.view(tokens, self.n_group, experts // self.n_group)
        group_score = groups.topk(2, dim=-1).values.sum(-1)
        chosen = group_score.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_score).scatter_(1, chosen, 1.0)
        keep = keep[:, :, None].expand_as(groups).reshape(tokens, experts)
        topk_idx = choice.masked_fill(~keep.bool(), float("-inf")).topk(self.top_k, dim=-1)[1]
        topk_weight = scores.gather(1, topk_idx).type_as(logits)
        if self.top_k > 1:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight * self.routed_scaling_factor, logits


class LLaDA2MoeSparseMoeBlock(_Block20):
    gate_class = LLaDA2MoeGate

    def forward(self, hidden_states):
        y, (router_logits, topk_idx) = super().forward(hidden_states)
        return y, (router_logits, topk_idx.view(*hidden_states.shape[:-1], -1))


class LLaDA2MoeDecoderLayer(_Layer20):
    moe_block = LLaDA2MoeSparseMoeBlock


class LLaDA2MoeModel(_Model20):
    config_class = LLaDA2MoeConfig
    decoder_layer = LLaDA2MoeDecoderLayer

    def prepare_mask(self, attention_mask, shape, h):
        if attention_mask is not None and attention_mask.dim() == 4:
            return super().prepare_mask(attention_mask, shape, h)
        return _prepare_4d_causal_attention_mask_for_sdpa(attention_mask, shape, h, 0)


class LLaDA2MoeModelLM(_ModelLM20):
    config_class = LLaDA2MoeConfig
    base_model_class = LLaDA2MoeModel
