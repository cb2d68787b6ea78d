"""Tiny stand-ins for the LLaDA family's Hub remote code (LLaDA-8B, LLaDA-MoE, LLaDA2.x, Dream),
written here from the structure in shared/reference/llada-family-backbones.md (`standins.py`)."""
