#!/usr/bin/env bash
# Quick start: set up .venv, draw 5 photos of a held-out toy-world concept, personalize the shipped
# toy model with zoodip (export -> w8 quantize -> torch-free ZO training -> sample grid).
# Everything lands in runs/quickstart/ (idempotent: a second run reuses finished stages).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-runs/quickstart}
STEPS=${STEPS:-3000}
INIT=$(python -m models.toyworld.concept "$OUT/images" --index "${CONCEPT:-0}")
echo "concept: $(tr -d '\n ' < "$OUT/images/concept.json")"
zoodip personalize models/toyworld/pipeline --images "$OUT/images" --token sks --init "$INIT" \
    --out "$OUT" --steps "$STEPS" --lr "${LR:-2e-2}" --set save_every=250 \
    ${ZO_FLAGS---directions jacobian}
echo "training photos: $OUT/images/   learned token: $OUT/learned_embeds.safetensors"
echo "samples ('a photo of sks'): $OUT/samples/grid.png   log: $OUT/log.jsonl"
