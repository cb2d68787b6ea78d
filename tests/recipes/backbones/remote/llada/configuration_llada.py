"""Stand-in for LLaDA-8B's `configuration_llada.py` (structure only, our own code)."""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    """LLaDA's OLMo-style fields; dropouts default to 0.1 as in the original `ModelConfig`."""

    model_type = "llada"

    def __init__(
        self,
        d_model=32,
        n_heads=2,
        n_layers=2,
        mlp_hidden_size=64,
        vocab_size=300,
        embedding_size=None,
        max_sequence_length=512,
        rope_theta=10000.0,
        weight_tying=True,
        embedding_dropout=0.1,
        attention_dropout=0.1,
        residual_dropout=0.1,
        rms_norm_eps=1e-5,
        mask_token_id=None,
        init_device="cpu",
        use_cache=False,
        **kwargs,
    ):
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.mlp_hidden_size, self.vocab_size = mlp_hidden_size, vocab_size
        self.embedding_size = embedding_size
        self.max_sequence_length, self.rope_theta = max_sequence_length, rope_theta
        self.weight_tying = weight_tying
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.residual_dropout = residual_dropout
        self.rms_norm_eps, self.mask_token_id = rms_norm_eps, mask_token_id
        self.init_device = init_device
        super().__init__(use_cache=use_cache, **kwargs)
