"""Stand-in for LLaDA-MoE's `configuration_lladamoe.py` (structure only, our own code)."""

from transformers import PretrainedConfig
from transformers.modeling_rope_utils import rope_config_validation


class LLaDAMoEConfig(PretrainedConfig):
    model_type = "lladamoe"

    def __init__(
        self,
        vocab_size=-1,
        hidden_size=32,
        dense_intermediate_size=64,
        expert_intermediate_size=16,
        shared_expert_intermediate_size=None,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_layer_freq=None,
        norm_topk_prob=True,
        moe_router_enable_expert_bias=False,
        qk_layernorm=True,
        partial_rotary_factor=1.0,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
        use_cache=False,
        pad_token_id=1,
        eos_token_id=50279,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.dense_intermediate_size = dense_intermediate_size
        self.expert_intermediate_size = expert_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq or [1] * num_hidden_layers
        self.norm_topk_prob = norm_topk_prob  # stored, never used (hard-coded False)
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.qk_layernorm, self.partial_rotary_factor = qk_layernorm, partial_rotary_factor
        self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
        self.max_position_embeddings, self.rms_norm_eps = max_position_embeddings, rms_norm_eps
        self.attention_dropout, self.use_cache = attention_dropout, use_cache
        rope_config_validation(self)
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
