"""Closed-loop colour mixing: scoring, recipe constraints and the physics-shaped optimiser."""
