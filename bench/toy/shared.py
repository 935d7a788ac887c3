"""What the toy-world benchmarks and analyses share: the shipped model, the token, and the toy TI's pieces."""
from __future__ import annotations

from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[2] / "models" / "toyworld" / "pipeline"   # the shipped toy model
TOKEN = "sks"                  # the placeholder every method learns
GOAL_PASSES = 9000             # the budget: 1/10 of the reference 30,000 steps x 3 passes
