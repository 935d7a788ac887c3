#!/usr/bin/env bash
# OpenVINO check a person or CI can run: quantize the tiny model for --target openvino in .venv, then run
# tests/test_openvino.py in .venv-openvino (OpenVINOExecutionProvider, device CPU) against the CPU provider.
# Usage: scripts/openvino_check.sh [SCHEME]   (default w8; needs scripts/setup.sh and scripts/setup_openvino.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
SCHEME=${1:-w8}
WORK=${ZOODIP_OPENVINO_WORK:-runs/openvino-check}
PHOTOS=${ZOODIP_OPENVINO_PHOTOS:-$WORK/photos}
mkdir -p "$WORK"
[ -x .venv-openvino/bin/python ] || bash scripts/setup_openvino.sh
. .venv/bin/activate
# Default photos: procedural toy-world scenes (nothing outside the repository is needed).
[ -d "$PHOTOS" ] || python -m models.toyworld.concept "$PHOTOS" --index 0 >/dev/null
python - "$WORK" "$PHOTOS" "$SCHEME" <<'PY'
import sys
from pathlib import Path
from export.replica import write_replica
from export.onnx_export import export_model
from export.quantize import QuantizeConfig, quantize_model
work, photos, scheme = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
src = write_replica("tiny", work / "tiny", seed=0) if not (work / "tiny" / "model_index.json").is_file() else work / "tiny"
exported = export_model(src, work / "tiny-onnx")
quantize_model(exported, work / f"tiny-{scheme}-openvino",
               QuantizeConfig(scheme=scheme, target="openvino", calib_images=photos, gate=False))
PY
deactivate
. .venv-openvino/bin/activate
ZOODIP_OPENVINO_MODEL="$WORK/tiny-$SCHEME-openvino" ZOODIP_OPENVINO_PHOTOS="$PHOTOS" \
    python -m pytest -q -s -m openvino tests/test_openvino.py -p no:cacheprovider
