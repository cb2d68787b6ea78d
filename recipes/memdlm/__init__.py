"""MemDLM (arXiv 2603.22241) and the standard masked-diffusion baseline."""
