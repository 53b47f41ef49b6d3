#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the pipeline and test extras.
# torch is pinned to the 2.13.0 CPU wheel first, so no multi-GB CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[pipeline,test]"
echo "setup: $(python -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)')"
