"""Recipes: readable programs that compose bilevel, diffusion and memory."""
