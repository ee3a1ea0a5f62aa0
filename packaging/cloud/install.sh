#!/usr/bin/env bash
# Install the cloud services into the current Python environment from built wheels:
#
#   install.sh WHEEL_DIR [CONSTRAINTS]
#
# WHEEL_DIR holds deepfusion_shared-*.whl and deepfusion_cloud-*.whl (`pip wheel --no-deps shared cloud`).
# CONSTRAINTS defaults to constraints.txt beside this script (the image), else packaging/constraints.txt
# (the repository). PYTHON (default: python) names the environment's interpreter.
#
# An installed torch is kept: a CUDA base image ships its own build, and the constraints' CPU pin of
# torch is replaced by the installed version, so pip sees it as satisfied and never swaps it. Without
# one, the constraints' torch is installed.
set -euo pipefail

usage() { echo "usage: $0 WHEEL_DIR [CONSTRAINTS]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WHEELS=$1
if [ $# -eq 2 ]; then
    CONSTRAINTS=$2
elif [ -f "$HERE/constraints.txt" ]; then
    CONSTRAINTS=$HERE/constraints.txt
else
    CONSTRAINTS=$HERE/../constraints.txt
fi
PYTHON=${PYTHON:-python}
[ -f "$CONSTRAINTS" ] || { echo "error: no constraints file at $CONSTRAINTS" >&2; exit 2; }

wheel() {
    local found
    found=$(ls "$WHEELS"/"$1"-*.whl 2>/dev/null | sort | tail -n 1 || true)
    [ -n "$found" ] || { echo "error: no $1-*.whl in $WHEELS" >&2; exit 2; }
    echo "$found"
}
shared_wheel=$(wheel deepfusion_shared)
cloud_wheel=$(wheel deepfusion_cloud)

torch_version() {
    "$PYTHON" -c 'from importlib.metadata import version
try:
    print(version("torch"))
except Exception:
    pass'
}

torch_before=$(torch_version)
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
if [ -n "$torch_before" ]; then
    echo "keeping the installed torch $torch_before"
    grep -v -E '^[[:space:]]*torch[[:space:]]*(==|>|<|~|!|$)' "$CONSTRAINTS" >"$pins"
    echo "torch==$torch_before" >>"$pins"
else
    cp "$CONSTRAINTS" "$pins"
fi

"$PYTHON" -m pip install --disable-pip-version-check -c "$pins" "$shared_wheel[s3]" "$cloud_wheel"

torch_after=$(torch_version)
if [ -n "$torch_before" ] && [ "$torch_after" != "$torch_before" ]; then
    echo "error: the install replaced torch $torch_before with $torch_after" >&2
    exit 1
fi

# Smoke check: the entry point and the modules every service imports.
bindir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
"$bindir/deepfusion-cloud" --version
"$PYTHON" -c "import deepfusion.cloud.trainer, deepfusion.cloud.ingest_service, deepfusion.cloud.coordinator"
echo "deepfusion-cloud installed (torch $torch_after)"
