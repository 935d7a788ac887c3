#!/usr/bin/env bash
# The project's test command (README and CI run exactly this). Uses .venv from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q "$@"
