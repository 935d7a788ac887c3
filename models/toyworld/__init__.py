"""Toy world: procedural images, a small SD-format model trained on them, and an attribute classifier."""
