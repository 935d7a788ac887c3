#!/usr/bin/env bash
# Create .venv with zoodip, its export side (torch CPU wheel) and test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and exactly: a bare `torch` requirement would pull a multi-GB CUDA build.
pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[export,test,plot,ray]" 2>&1 | grep -v "is ignored" || true
python -c "import zo_runtime, export, torch, onnxruntime; print('setup ok: torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"
