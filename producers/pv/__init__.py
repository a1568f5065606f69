"""Simulated photovoltaic test instruments: the physics in `models` (plain functions, seeded)."""
