#!/usr/bin/env bash
# On an offline GPU machine, in a copy of the checkout that holds the folder
# scripts/device/stage.sh wrote: join the wheel's parts if it was cut, check every wheel
# against SHA256SUMS, install onnxruntime-gpu and this checkout into a private folder without
# network (--no-index; onnx, numpy, typer, Pillow, pytest ... must already be installed in
# the machine's python3), point the CUDA provider at the nvidia-* CUDA / cuDNN libraries
# installed with pip (PyTorch brings them), and run scripts/gpu_check.sh.
#
# Usage: bash scripts/device/install_offline.sh [STAGE_DIR] [OUTDIR]
#   (defaults .whl and $OUT or gpu_check_out; the site folder is $SITE, default /tmp/onnx-excite-site)
set -uo pipefail
cd "$(dirname "$0")/../.."
dir="${1:-.whl}"
out="${2:-${OUT:-gpu_check_out}}"
site="${SITE:-/tmp/onnx-excite-site}"
[ -f "$dir/SHA256SUMS" ] || { echo "no $dir/SHA256SUMS: run scripts/device/stage.sh first" >&2; exit 2; }
dir="$(cd "$dir" && pwd)"
if [ -d "$dir/parts" ]; then
    for first in "$dir"/parts/*.part00; do
        cat "${first%00}"?? > "$dir/wheels/$(basename "${first%.part00}")"
    done
fi
(cd "$dir/wheels" && sha256sum -c --quiet ../SHA256SUMS) || { echo "a staged wheel is missing or incomplete" >&2; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$dir"/wheels/*.whl || exit 4
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . || exit 5
# PYTHONSAFEPATH: the installed onnx_excite (with its cli and models subpackages), not ./onnx_excite
export PYTHONPATH="$site" PYTHONSAFEPATH=1 PATH="$site/bin:$PATH" XDG_CACHE_HOME="$dir/cache"
# ORT's preload_dlls looks for the nvidia-* libraries beside onnxruntime (now in $site): name their folders
nv=$(python3 -c "
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = {os.path.dirname(p) for root in nvidia.__path__ for p in glob.glob(os.path.join(root, '**', 'lib*.so*'), recursive=True)}
print(':'.join(sorted(dirs)))")
export LD_LIBRARY_PATH="$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bash scripts/gpu_check.sh "$out"
