#!/usr/bin/env bash
# Quick start: set up .venv, draw 5 photos of a held-out toy-world concept, personalize the shipped
# toy model with zoodip (export -> w8 quantize -> init search + torch-free ZO training -> sample grid).
# Everything lands in runs/quickstart/ (idempotent: a second run reuses finished stages).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-runs/quickstart}
INIT=$(python -m models.toyworld.concept "$OUT/images" --index "${CONCEPT:-0}")
WORDS=$(python -c "from models.toyworld import world; print(','.join(world.WORDS))")
echo "concept: $(tr -d '\n ' < "$OUT/images/concept.json")"
# the default fast schedule; --init-candidates: every word of the toy world (ZO_FLAGS= leaves the search out)
zoodip personalize models/toyworld/pipeline --images "$OUT/images" --token sks --init "$INIT" \
    --out "$OUT" ${STEPS:+--steps "$STEPS"} ${LR:+--lr "$LR"} --set save_every=250 \
    ${ZO_FLAGS---init-candidates "$WORDS"}
python -m models.toyworld.read "$OUT/samples" "$OUT/images/concept.json"
echo "training photos: $OUT/images/   learned token: $OUT/learned_embeds.safetensors"
echo "samples ('a photo of sks'): $OUT/samples/grid.png   log: $OUT/log.jsonl"
