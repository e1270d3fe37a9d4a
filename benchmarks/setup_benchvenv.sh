#!/usr/bin/env bash
# Build the separate benchmark venv (never the dev venv): torch 2.13.0 CPU, the three peers,
# and this checkout (editable, no deps) with its runtime deps. Usage: bash benchmarks/setup_benchvenv.sh [VENV]
set -euo pipefail
VENV=${1:-/work/benchvenv}
HERE=$(cd "$(dirname "$0")" && pwd)
python3 -m venv "$VENV"
"$VENV/bin/pip" install torch==2.13.0
"$VENV/bin/pip" install -c "$HERE/constraints.txt" pyhessian==0.1 hessian-eigenthings curvlinops-for-pytorch \
    scikit-learn numpy scipy
# curvlinops pulls torchvision, which cannot load beside torch 2.13.0; nothing here needs it.
"$VENV/bin/pip" uninstall -y torchvision
"$VENV/bin/pip" install -c "$HERE/constraints.txt" -e "$HERE/.." --no-deps
"$VENV/bin/pip" install -c "$HERE/constraints.txt" lightning torchmetrics tensorboard
"$VENV/bin/python" -c "import torch, pyhessian, hessian_eigenthings, curvlinops; print('torch', torch.__version__)"
