"""Stand-in for LLaDA-8B's `modeling_llada.py` (Hub version): our own code, same structure.

Quirks kept: the LM's `__init__` never calls `post_init()`; `LLaDAModel` is a plain nn.Module
with `transformer.{wte, emb_drop, blocks, ln_f, ff_out}`; blocks hold `ff_proj`/`up_proj`/
`ff_out` directly and return `(x, cache)`; RoPE lives in each block (`arange`, no
position_ids); a 2-D mask masks keys only (bidirectional) and a user `attention_bias` is
silently dropped; fp32 RMSNorm returning `weight * x`; no head module when `weight_tying`.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig


class RMSLayerNorm(nn.Module):
    def __init__(self, size, eps, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Sin/cos tables in a plain dict (not buffers), built lazily in fp32."""

    def __init__(self, head_dim, theta):
        super().__init__()
        self.head_dim, self.theta, self.cache = head_dim, theta, {}

    def tables(self, length, device):
        key = (length, str(device))
        if key not in self.cache:
            inv = 1.0 / self.theta ** (
                torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim
            )
            angles = torch.outer(torch.arange(length, device=device).float(), inv)
            angles = torch.cat([angles, angles], dim=-1)
            self.cache[key] = (angles.sin(), angles.cos())
        return self.cache[key]

    def forward(self, q, k):
        sin, cos = self.tables(k.shape[-2], q.device)

        def rotate(t):
            a, b = t.float().chunk(2, dim=-1)
            return (t.float() * cos + torch.cat([-b, a], dim=-1) * sin).to(t.dtype)

        return rotate(q), rotate(k)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, layer_id, config, device):
        super().__init__()
        d, h = config.d_model, config.mlp_hidden_size
        self.layer_id, self.n_heads = layer_id, config.n_heads
        self.attn_norm = RMSLayerNorm(d, config.rms_norm_eps, device)
        self.ff_norm = RMSLayerNorm(d, config.rms_norm_eps, device)
        self.q_proj = nn.Linear(d, d, bias=False, device=device)
        self.k_proj = nn.Linear(d, d, bias=False, device=device)
        self.v_proj = nn.Linear(d, d, bias=False, device=device)
        self.attn_out = nn.Linear(d, d, bias=False, device=device)
        self.ff_proj = nn.Linear(d, h, bias=False, device=device)
        self.up_proj = nn.Linear(d, h, bias=False, device=device)
        self.ff_out = nn.Linear(h, d, bias=False, device=device)
        self.act = nn.SiLU()
        self.rotary_emb = RotaryEmbedding(d // config.n_heads, config.rope_theta)
        self.dropout = nn.Dropout(config.residual_dropout)
        self.attention_dropout = config.attention_dropout

    def attention(self, x, attention_bias):
        b, length, d = x.shape
        heads = (b, length, self.n_heads, d // self.n_heads)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (p(x).view(heads).transpose(1, 2) for p in projections)
        q, k = self.rotary_emb(q, k)
        if attention_bias is not None:
            lq, lk = q.shape[-2], k.shape[-2]
            attention_bias = attention_bias[:, :, lk - lq : lk, :lk].to(q.dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_bias,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=False,
        )
        return self.attn_out(out.transpose(1, 2).reshape(b, length, d))

    def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
        x = x + self.dropout(self.attention(self.attn_norm(x), attention_bias))
        h = self.ff_norm(x)
        h = self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h))
        return x + self.dropout(h), None


class LLaDAOutput(NamedTuple):
    logits: torch.Tensor
    attn_key_values: object
    hidden_states: tuple | None


class LLaDAModel(nn.Module):
    """A plain nn.Module, as in the Hub file (no PreTrainedModel machinery)."""

    def __init__(self, config, init_params=True):
        super().__init__()
        self.config = config
        device = config.init_device
        width = config.embedding_size or config.vocab_size
        modules = {
            "wte": nn.Embedding(width, config.d_model, device=device),
            "emb_drop": nn.Dropout(config.embedding_dropout),
            "blocks": nn.ModuleList(
                LLaDALlamaBlock(i, config, device) for i in range(config.n_layers)
            ),
            "ln_f": RMSLayerNorm(config.d_model, config.rms_norm_eps, device),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, width, bias=False, device=device)
        self.transformer = nn.ModuleDict(modules)
        if init_params:
            self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        attention_bias=None,
        past_key_values=None,
        use_cache=False,
        output_hidden_states=None,
    ):
        assert past_key_values is None and not use_cache, "this model has no cache"
        x = self.transformer.emb_drop(self.transformer.wte(input_ids))
        attention_bias = None  # the Hub version drops a user-supplied bias
        if attention_mask is not None and 0.0 in attention_mask:
            keys = attention_mask.to(torch.float32).view(x.shape[0], -1)[:, None, None, :]
            attention_bias = (1.0 - keys) * torch.finfo(torch.float32).min
        hidden = []
        for block in self.transformer.blocks:
            if output_hidden_states:
                hidden.append(x)
            x, _ = block(x, attention_bias=attention_bias)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden.append(x)
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight)
        else:
            logits = self.transformer.ff_out(x)
        return LLaDAOutput(logits, None, tuple(hidden) if output_hidden_states else None)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]

    def __init__(self, config, model=None, init_params=False):
        super().__init__(config)
        if model is None:
            self.model = LLaDAModel(config, init_params=True)
        else:
            self.model = model
        # The Hub file never calls self.post_init() here.

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        attention_bias=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
    ):
        if output_attentions:
            raise ValueError("output_attentions is not yet supported in LLaDA")
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            attention_bias=attention_bias,
            past_key_values=past_key_values,
            use_cache=bool(use_cache),
            output_hidden_states=output_hidden_states,
        )
        return CausalLMOutputWithPast(logits=out.logits, hidden_states=out.hidden_states)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def tie_weights(self):
        if self.config.weight_tying:
            return None  # logits use wte.weight directly
        return None
