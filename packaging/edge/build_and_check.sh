#!/usr/bin/env bash
# Build the device's wheels and check them the way a device installs them: a clean virtualenv with
# deepfusion-edge[gguf] only (llama.cpp, no torch, transformers or boto3), then `--version` and `info`.
#
#   packaging/edge/build_and_check.sh MODEL.gguf [WORK_DIR]
#
# MODEL.gguf needs its tokenizer.json beside it (as `deepfusion-edge export --format gguf` writes it).
# WORK_DIR (default: a new temporary folder) receives wheels/ and venv/. PYTHON (default python3) builds
# the wheels and the virtualenv.
#
# llama-cpp-python has no binary wheel on PyPI: pip builds it from source (minutes) and keeps the built
# wheel in its cache. The wheel is taken once with `pip wheel` under the same CMAKE_ARGS as
# `make setup` (the cached wheel is reused; a cache miss builds it once, portably) and installed from
# wheels/, so the clean virtualenv never compiles it.
set -euo pipefail

usage() { echo "usage: $0 MODEL.gguf [WORK_DIR]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
MODEL=$1
[ -f "$MODEL" ] || { echo "error: $MODEL is not a file" >&2; exit 2; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${2:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=$ROOT/packaging/constraints.txt
WHEELS=$WORK/wheels
VENV=$WORK/venv
export CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '==> %s\n' "$*"; }

step "wheels of deepfusion-shared and deepfusion-edge -> $WHEELS"
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
"$PYTHON" -m pip wheel --quiet --no-deps -w "$WHEELS" "$ROOT/shared" "$ROOT/edge"
step "llama-cpp-python wheel (pip's cache, or one portable build)"
start=$SECONDS
"$PYTHON" -m pip wheel --quiet --no-deps -c "$CONSTRAINTS" -w "$WHEELS" llama-cpp-python
echo "llama-cpp-python wheel ready in $((SECONDS - start)) s"

step "clean virtualenv $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
shared_wheel=$(ls "$WHEELS"/deepfusion_shared-*.whl)
edge_wheel=$(ls "$WHEELS"/deepfusion_edge-*.whl)
start=$SECONDS
"$VENV/bin/python" -m pip install --quiet --only-binary llama-cpp-python --find-links "$WHEELS" \
    -c "$CONSTRAINTS" "$shared_wheel" "$edge_wheel[gguf]"
echo "deepfusion-edge[gguf] installed in $((SECONDS - start)) s"

step "the device's environment holds no training or cloud packages"
"$VENV/bin/python" - <<'EOF'
import sys
from importlib.metadata import distributions

names = {d.metadata["Name"].lower().replace("_", "-") for d in distributions()}
heavy = sorted(names & {"torch", "transformers", "boto3", "botocore", "peft", "optimum", "accelerate"})
if heavy:
    sys.exit(f"error: deepfusion-edge[gguf] pulled {', '.join(heavy)}")
print("installed:", ", ".join(sorted(n for n in names if n.startswith(("deepfusion", "llama", "gguf")))))
EOF

step "deepfusion-edge --version"
"$VENV/bin/deepfusion-edge" --version
step "deepfusion-edge info $MODEL"
"$VENV/bin/deepfusion-edge" info "$MODEL"
