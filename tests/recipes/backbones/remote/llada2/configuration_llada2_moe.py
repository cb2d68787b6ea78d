"""Stand-in for LLaDA2.x's `configuration_llada2_moe.py` (structure only, our own code)."""

from transformers import PretrainedConfig


class LLaDA2MoeConfig(PretrainedConfig):
    """Defaults as the original: use_cache True, attention_dropout 0.1, pad 126081 (out of
    range for the default vocabulary), partial_rotary_factor 0.5, routed_scaling_factor 2.5."""

    model_type = "llada2_moe"

    def __init__(
        self,
        vocab_size=30592,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=0,
        head_dim=None,
        use_qkv_bias=False,
        use_bias=False,
        use_qk_norm=True,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_dropout=0.1,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rope_scaling=None,
        partial_rotary_factor=0.5,
        use_cache=True,
        pad_token_id=126081,
        num_experts=8,
        num_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        moe_intermediate_size=16,
        first_k_dense_replace=0,
        routed_scaling_factor=2.5,
        moe_router_enable_expert_bias=True,
        **kwargs,
    ):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.use_qkv_bias, self.use_bias, self.use_qk_norm = use_qkv_bias, use_bias, use_qk_norm
        self.rms_norm_eps, self.attention_dropout = rms_norm_eps, attention_dropout
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, rope_theta
        self.rope_scaling, self.partial_rotary_factor = rope_scaling, partial_rotary_factor
        self.use_cache = use_cache
        self.num_experts, self.num_shared_experts = num_experts, num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group, self.topk_group = n_group, topk_group
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        super().__init__(
            pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs
        )
