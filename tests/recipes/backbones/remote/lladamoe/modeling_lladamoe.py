"""Stand-in for LLaDA-MoE's `modeling_lladamoe.py`: our own code, same structure.

Quirks kept: `modeling_attn_mask_utils` and `ROPE_INIT_FUNCTIONS['default']` (4.x only); every
attention layer turns the 2-D mask into a bidirectional key mask itself (a 4-D mask fails);
`model.layers[i].mlp.experts[j].{gate,up,down}_proj` in a ModuleList, EVERY expert called with
its flattened routed rows (n, hidden), also (0, hidden); softmax routing with `expert_bias`
added after the softmax, `norm_topk_prob` ignored; the shared expert on the decoder layer
(`layers[i].shared_expert`); layers return `(h,)`; no cache, and `cache_position` must be None.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_attn_mask_utils import AttentionMaskConverter
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_lladamoe import LLaDAMoEConfig


class LLaDAMoERMSNorm(nn.Module):
    def __init__(self, size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LLaDAMoERotaryEmbedding(nn.Module):
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
    """RoPE on the first cos.shape[-1] dims of each head; the rest passes through."""
    width = cos.shape[-1]
    rot, rest = t[..., :width], t[..., width:]
    a, b = rot.chunk(2, dim=-1)
    rot = rot * cos[:, None] + torch.cat([-b, a], dim=-1) * sin[:, None]
    return torch.cat([rot, rest], dim=-1)


class LLaDAMoESdpaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.is_causal = config.head_dim, False
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:
            self.q_norm = LLaDAMoERMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = LLaDAMoERMSNorm(self.head_dim, config.rms_norm_eps)
        self.dropout = config.attention_dropout

    def forward(self, hidden_states, attention_mask, position_embeddings):
        b, length, _ = hidden_states.shape
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.qk_layernorm:  # over head_dim, on (-1, head_dim) rows
            q = self.q_norm(q.reshape(-1, self.head_dim))
            k = self.k_norm(k.reshape(-1, self.head_dim))
        q = q.reshape(b, length, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = rotate_partial(q, cos, sin), rotate_partial(k, cos, sin)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        mask = None
        if attention_mask is not None:
            converter = AttentionMaskConverter(is_causal=False)
            mask = converter.to_4d(attention_mask, length, dtype=q.dtype, key_value_length=length)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class LLaDAMoEMLP(nn.Module):
    def __init__(self, config, intermediate_size):
        super().__init__()
        h = config.hidden_size
        self.gate_proj = nn.Linear(h, intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, h, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LLaDAMoESparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            LLaDAMoEMLP(config, config.expert_intermediate_size) for _ in range(self.num_experts)
        )
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts))
        else:
            self.expert_bias = None

    def forward(self, hidden_states):
        b, length, width = hidden_states.shape
        flat = hidden_states.view(-1, width)
        logits = self.gate(flat)
        weights = F.softmax(logits, dim=1, dtype=torch.float)
        if self.expert_bias is not None:
            weights = weights + self.expert_bias  # kept inside the weights
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        # norm_topk_prob is hard-coded False here, whatever the config says
        weights = weights.to(flat.dtype)
        out = torch.zeros_like(flat)
        expert_mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):  # every expert, also with zero rows
            idx, top_x = torch.where(expert_mask[e])
            rows = flat[None, top_x].reshape(-1, width)
            y = self.experts[e](rows) * weights[top_x, idx, None]
            out.index_add_(0, top_x, y.to(flat.dtype))
        return out.reshape(b, length, width)


class LLaDAMoEDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = LLaDAMoESdpaAttention(config, layer_idx)
        moe = bool(config.moe_layer_freq[layer_idx])
        if moe:
            self.mlp = LLaDAMoESparseMoeBlock(config)
        else:
            self.mlp = LLaDAMoEMLP(config, config.dense_intermediate_size)
        self.shared_expert = None
        if moe and config.shared_expert_intermediate_size is not None:
            self.shared_expert = LLaDAMoEMLP(config, config.shared_expert_intermediate_size)
        self.input_layernorm = LLaDAMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LLaDAMoERMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        output_router_logits=False,
        use_cache=False,
        cache_position=None,
        position_embeddings=None,
        **kwargs,
    ):
        del use_cache  # forced off
        h = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), attention_mask, position_embeddings
        )
        normed = self.post_attention_layernorm(h)
        out = self.mlp(normed)
        if self.shared_expert is not None:
            out = out + self.shared_expert(normed)
        return (h + out,)  # router logits are never appended


class LLaDAMoEPreTrainedModel(PreTrainedModel):
    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDAMoEDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)


class LLaDAMoEModel(LLaDAMoEPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.layers = nn.ModuleList(
            LLaDAMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = LLaDAMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LLaDAMoERotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

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
        cache_position=None,
    ):
        assert not use_cache and past_key_values is None and cache_position is None
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device)[None]
        position_embeddings = self.rotary_emb(h, position_ids)
        hidden = []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(h)
            h = layer(
                h,
                attention_mask=attention_mask,  # passed through unchanged
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )[0]
        h = self.norm(h)
        if output_hidden_states:
            hidden.append(h)
        return BaseModelOutputWithPast(
            last_hidden_state=h, hidden_states=tuple(hidden) if output_hidden_states else None
        )


class LLaDAMoEModelLM(LLaDAMoEPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = LLaDAMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

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
        cache_position=None,
        num_logits_to_keep=0,
    ):
        assert labels is None and num_logits_to_keep == 0
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )
        return MoeCausalLMOutputWithPast(
            logits=self.lm_head(out.last_hidden_state), hidden_states=out.hidden_states
        )
