#!/usr/bin/env bash
# Create .venv-openvino: zoodip's torch-free runtime on onnxruntime-openvino (OpenVINOExecutionProvider).
# onnxruntime-openvino ships the same `onnxruntime` module as the CPU wheel, so it needs its own venv;
# zoodip is installed with --no-deps so pip never pulls the plain onnxruntime wheel over it. Idempotent.
# Export/quantize stay in .venv (torch, optimum); this venv only runs models: see scripts/openvino_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-openvino/bin/python ] || "$PY" -m venv .venv-openvino
. .venv-openvino/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
pip install -q "onnxruntime-openvino>=1.20" 2>&1 | grep -v "is ignored" || true
# zoodip's runtime dependencies minus onnxruntime, plus pytest. tokenizers 0.23 changed RobertaProcessing(cls=...),
# which zo_runtime/tokenizer.py uses: keep < 0.23 (the version transformers 4.57 also requires).
pip install -q "numpy>=1.26" "onnx>=1.16" "click>=8.1" "pillow>=10" "safetensors>=0.4" "tokenizers>=0.19,<0.23" \
    "tqdm>=4.66" "pytest>=8" 2>&1 | grep -v "is ignored" || true
pip install -q --no-deps -e . 2>&1 | grep -v "is ignored" || true
python -c "import onnxruntime as o; eps = o.get_available_providers(); print('onnxruntime', o.__version__, eps); \
assert 'OpenVINOExecutionProvider' in eps, 'OpenVINOExecutionProvider missing'"
