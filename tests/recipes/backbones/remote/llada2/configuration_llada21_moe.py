"""Stand-in for LLaDA2.1's `configuration_llada21_moe.py` (structure only, our own code).

The class keeps 2.0's name; `num_key_value_heads=0` means "as many as the attention heads"
(2.0's stand-in already reads it so). A 2.1 checkpoint's config.json still says `llada2_moe`
while its auto_map points here, so transformers warns that a `llada2_moe` config instantiates
a `llada21_moe` model.
"""

from .configuration_llada2_moe import LLaDA2MoeConfig as _Config20


class LLaDA2MoeConfig(_Config20):
    model_type = "llada21_moe"
