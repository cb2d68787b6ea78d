"""memory: parametric fast weights (LoRA and full-matrix) that attach to any model."""
