"""diffusion: masked (absorbing-state) diffusion language modelling."""
