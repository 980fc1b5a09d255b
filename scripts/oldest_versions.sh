#!/usr/bin/env bash
# The tests that lean hardest on torch, transformers, accelerate, peft and datasets, run on the oldest versions
# prefalign supports (scripts/oldest_versions.txt, pyproject.toml's lower bounds) in ./.venv-oldest. CI runs
# this after the main suite, which runs on the newest versions (scripts/setup.sh). The venv is made anew when
# the pins change and reused otherwise. torch 2.11 from PyPI is the CUDA build: with its nvidia-* libraries it
# is about 2.4 GB of wheels (pip keeps them in its cache) and a 4.7 GB venv; it runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PINS=scripts/oldest_versions.txt
VENV=.venv-oldest
stamp="$(sha256sum "$PINS" | cut -d' ' -f1)"
if [ "$(cat "$VENV/pins.sha256" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# Every time: quick when nothing changed, and it picks up a dependency added to pyproject.toml. --no-compile:
# byte-compiling all of torch and its CUDA packages took half of a fresh install's CPU time; tests compile
# what they import.
"$VENV/bin/python" -m pip install -q --no-compile -c "$PINS" -e ".[dev,gguf]"
echo "$stamp" > "$VENV/pins.sha256"

# The versions installed are the pinned ones (a pin pip could not honour fails here, not in a test).
"$VENV/bin/python" - "$PINS" <<'EOF'
import sys
from importlib.metadata import version

pins = [line.split("==") for line in open(sys.argv[1]) if "==" in line and not line.startswith("#")]
got = {name: version(name) for name, _ in pins}
wrong = [f"{name} {got[name]} (pinned {want.strip()})" for name, want in pins
         if got[name].split("+")[0] != want.strip()]
if wrong:
    sys.exit("oldest versions: not what scripts/oldest_versions.txt pins: " + ", ".join(wrong))
print("oldest versions:", ", ".join(f"{name} {v}" for name, v in got.items()))
EOF

# Model families (every head, layout and precision on the fast path, peft-wrapped models), data loading (the
# datasets floor), training families, and the multi-process runs (DDP over gloo, FSDP2). End-to-end training
# of every loss (test_train.py) and model loading run on the newest versions only: CI's 15 minutes.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_model_families.py tests/test_data_*.py tests/test_training_families.py tests/test_multiprocess.py
