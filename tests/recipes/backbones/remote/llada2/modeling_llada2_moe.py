"""Stand-in for LLaDA2.x's `modeling_llada2_moe.py`: our own code, same structure.

Quirks kept: `modeling_attn_mask_utils` (4.x only); at the model level a 4-D bool mask becomes
additive, a 4-D float mask is used as is, and anything else goes through
`_prepare_4d_causal_attention_mask_for_sdpa`: None for None / all ones (bidirectional), but a
CAUSAL mask as soon as a 2-D mask holds a 0 (eager: always causal); a `DynamicCache` per call
when use_cache; router `mlp.gate` with a raw `weight` Parameter, fp32 sigmoid scores,
`expert_bias` for selection only, group-limited top-k, x routed_scaling_factor; experts
`mlp.experts[j].{gate,up,down}_proj` fed flattened rows: in train mode every expert, also
(0, hidden); in eval mode `moe_infer` under no_grad (argsort-sorted slices, empty experts
skipped); `mlp.shared_experts`; the block returns (y, (router_logits, topk_idx)); layers
return tuples; fp32 logits.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_attn_mask_utils import (
    _prepare_4d_causal_attention_mask,
    _prepare_4d_causal_attention_mask_for_sdpa,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_llada2_moe import LLaDA2MoeConfig


class LLaDA2MoeRMSNorm(nn.Module):
    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LLaDA2MoeRotaryEmbedding(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        inv_freq, self.scaling = ROPE_INIT_FUNCTIONS["default"](config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        angles = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
        angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * self.scaling).to(x.dtype), (angles.sin() * self.scaling).to(x.dtype)


def rotate_partial(t, cos, sin):
    width = cos.shape[-1]
    rot, rest = t[..., :width], t[..., width:]
    a, b = rot.chunk(2, dim=-1)
    rot = rot * cos[:, None] + torch.cat([-b, a], dim=-1) * sin[:, None]
    return torch.cat([rot, rest], dim=-1)


class LLaDA2MoeMLP(nn.Module):
    def __init__(self, config, intermediate_size):
        super().__init__()
        h = config.hidden_size
        self.gate_proj = nn.Linear(h, intermediate_size, bias=config.use_bias)
        self.up_proj = nn.Linear(h, intermediate_size, bias=config.use_bias)
        self.down_proj = nn.Linear(intermediate_size, h, bias=config.use_bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """Not an nn.Linear: a raw weight (E, hidden) and an `expert_bias` buffer."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = (
            config.num_experts_per_tok,
            config.n_group,
            config.topk_group,
        )
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = F.linear(flat.float(), self.weight.float())
        scores = torch.sigmoid(logits)
        choice = scores + self.expert_bias  # selection only
        tokens, experts = choice.shape
        groups = choice.view(tokens, self.n_group, experts // self.n_group)
        group_score = groups.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score).scatter_(
            1, group_score.topk(self.topk_group, dim=-1).indices, 1.0
        )
        keep = keep[:, :, None].expand_as(groups).reshape(tokens, experts)
        topk_idx = choice.masked_fill(keep == 0, float("-inf")).topk(self.top_k, dim=-1).indices
        topk_weight = scores.gather(1, topk_idx)
        if self.top_k > 1:
            topk_weight = topk_weight / topk_weight.sum(-1, keepdim=True)
        return topk_idx, topk_weight * self.routed_scaling_factor, logits


class LLaDA2MoeSparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts_per_tok = config.num_experts_per_tok
        self.experts = nn.ModuleList(
            LLaDA2MoeMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.gate = self.gate_class(config)
        if config.num_shared_experts is not None:
            width = config.moe_intermediate_size * config.num_shared_experts
            self.shared_experts = LLaDA2MoeMLP(config, width)

    def forward(self, hidden_states):
        identity, shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, router_logits = self.gate(hidden_states)
        flat = hidden_states.view(-1, shape[-1])
        flat_idx = topk_idx.view(-1)
        if self.training:
            x = flat.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(x)
            for i, expert in enumerate(self.experts):  # every expert, also with zero rows
                y[flat_idx == i] = expert(x[flat_idx == i]).to(y.dtype)
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
            y = y.to(hidden_states.dtype).view(shape)
        else:
            y = self.moe_infer(flat, topk_idx, topk_weight).view(shape)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(identity)
        return y, (router_logits.view(*shape[:-1], -1), topk_idx)

    @torch.no_grad()
    def moe_infer(self, x, topk_idx, topk_weight):
        counts = torch.bincount(topk_idx.view(-1), minlength=len(self.experts)).tolist()
        order = topk_idx.view(-1).argsort()
        rows = x[order // topk_idx.shape[1]]
        outputs, start = [], 0
        for i, n in enumerate(counts):
            if n == 0:
                continue  # empty experts are skipped in eval mode
            outputs.append(self.experts[i](rows[start : start + n]))
            start += n
        done = torch.cat(outputs, dim=0) if outputs else rows.new_empty(0)
        back = torch.empty_like(done)
        back[order] = done
        weighted = back.view(*topk_idx.shape, -1).float() * topk_weight.unsqueeze(-1)
        return weighted.sum(dim=1).to(x.dtype)


LLaDA2MoeSparseMoeBlock.gate_class = LLaDA2MoeGate


class LLaDA2MoeAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.is_causal = config.head_dim, False
        self.rope_dim = int(self.head_dim * config.partial_rotary_factor)  # computed, unused
        width = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, width, bias=config.use_qkv_bias)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.use_bias)
        if config.use_qk_norm:
            self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.dropout = config.attention_dropout

    def forward(self, hidden_states, attention_mask, position_embeddings):
        b, length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(b, length, -1, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.config.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        cos, sin = position_embeddings
        q, k = rotate_partial(q, cos, sin), rotate_partial(k, cos, sin)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        mask = None if attention_mask is None else attention_mask[..., : k.shape[-2]]
        dropout = self.dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":
            scores = q @ k.transpose(-1, -2) / self.head_dim**0.5
            if mask is not None:
                scores = scores + mask
            probs = F.dropout(torch.softmax(scores.float(), -1).to(q.dtype), dropout, self.training)
            out = probs @ v
        else:  # HF's SDPA integration: is_causal only when there is no mask and the flag says so
            is_causal = length > 1 and mask is None and self.is_causal
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal
            )
        return self.dense(out.transpose(1, 2).reshape(b, length, -1))


class LLaDA2MoeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        if layer_idx >= config.first_k_dense_replace:
            self.mlp = self.moe_block(config)
        else:
            self.mlp = LLaDA2MoeMLP(config, config.intermediate_size)
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        output_router_logits=False,
        use_cache=False,
        position_embeddings=None,
        **kwargs,
    ):
        h = hidden_states + self.attention(
            self.input_layernorm(hidden_states), attention_mask, position_embeddings
        )
        out = self.mlp(self.post_attention_layernorm(h))
        router = None
        if isinstance(out, tuple):
            out, router = out
        outputs = (h + out,)
        if output_attentions:
            outputs += (None,)
        if use_cache:
            outputs += (past_key_value,)
        if output_router_logits:
            outputs += (router,)
        return outputs


LLaDA2MoeDecoderLayer.moe_block = LLaDA2MoeSparseMoeBlock


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding, LLaDA2MoeGate)):
            nn.init.normal_(module.weight, std=0.02)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.layers = nn.ModuleList(
            self.decoder_layer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LLaDA2MoeRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def prepare_mask(self, attention_mask, shape, h):
        """2.0: a 4-D bool mask made additive, a 4-D float one as is; otherwise eager is always
        causal and SDPA causal as soon as a 2-D mask holds a 0."""
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype == torch.bool:
                low = torch.finfo(h.dtype).min
                attention_mask = torch.zeros_like(attention_mask, dtype=h.dtype).masked_fill(
                    ~attention_mask, low
                )
        elif self.config._attn_implementation == "eager":
            attention_mask = _prepare_4d_causal_attention_mask(attention_mask, shape, h, 0)
        else:
            attention_mask = _prepare_4d_causal_attention_mask_for_sdpa(attention_mask, shape, h, 0)
        return attention_mask

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        output_router_logits=None,
        return_dict=None,
        **kwargs,
    ):
        h = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, length = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if position_ids is None:
            position_ids = torch.arange(length, device=h.device)[None]
        attention_mask = self.prepare_mask(attention_mask, (b, length), h)
        position_embeddings = self.rotary_emb(h, position_ids)
        hidden = []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(h)
            h = layer(
                h,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_value=past_key_values,
                output_router_logits=bool(output_router_logits),
                use_cache=use_cache,
                position_embeddings=position_embeddings,
            )[0]
        h = self.norm(h)
        if output_hidden_states:
            hidden.append(h)
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden) if output_hidden_states else None,
        )


LLaDA2MoeModel.decoder_layer = LLaDA2MoeDecoderLayer


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        output_router_logits=None,
        return_dict=None,
        **kwargs,
    ):
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
        )
        logits = self.lm_head(out.last_hidden_state).float()  # upcast to fp32
        loss = None
        if labels is not None:  # the same position, no shift
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
        )


LLaDA2MoeModelLM.base_model_class = LLaDA2MoeModel
