"""Analyses of where the textual-inversion gradient lives (toy world)."""
