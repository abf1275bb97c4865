#!/usr/bin/env bash
# Stage what an offline GPU machine needs to run scripts/gpu_check.sh: the onnxruntime-gpu
# wheel (the version onnx_excite/data/cuda_kernels.json describes), the small pure-Python
# extras the GPU tests use, and the default model (so the machine needs no weights package).
# Run on a machine with network, in the checkout, with onnx-excite installed (command 1 of
# the README). Then copy the checkout with STAGE_DIR to the GPU machine and run
# scripts/device/install_offline.sh there.
#
# Usage: bash scripts/device/stage.sh [STAGE_DIR]      (default .whl, git-ignored)
#   PYTHON_VERSION=3.12   the GPU machine's Python (default: this python's)
#   PART_MIB=60           also cut the onnxruntime-gpu wheel (~256 MB) into parts of at most
#                         this many MiB, for a transfer that limits the size of one copy
#   ORT_PACKAGE=onnxruntime  stage the CPU build instead: a dry run of the whole path on a
#                         machine without a GPU (the CUDA tests then skip)
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="${1:-.whl}"
py="${PYTHON_VERSION:-$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
pkg="${ORT_PACKAGE:-onnxruntime-gpu}"
ver=$(python -c "import json; print(json.load(open('onnx_excite/data/cuda_kernels.json'))['onnxruntime_gpu'])")
if [ "$pkg" = onnxruntime-gpu ]; then spec="$pkg==$ver"; else spec="$pkg"; fi
rm -rf "$dir" && mkdir -p "$dir/wheels" "$dir/cache/onnx-excite"
python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir/wheels" "$spec"
# pure-Python extras the GPU tests use (float16 export)
python -m pip download -q --no-deps --only-binary=:all: -d "$dir/wheels" onnxconverter-common
(cd "$dir/wheels" && sha256sum -- *.whl) > "$dir/SHA256SUMS"
if [ -n "${PART_MIB:-}" ]; then
    mkdir -p "$dir/parts"
    for wheel in "$dir"/wheels/onnxruntime*.whl; do
        split -b "${PART_MIB}M" -d -a 2 "$wheel" "$dir/parts/$(basename "$wheel").part"
        rm "$wheel"
    done
fi
# the default model, built here from the weights package, for XDG_CACHE_HOME there
model=$(python -c "from onnx_excite.models.mobilenet_v2 import load_default_model as m; print(m())")
cp "$model" "$model.sha256" "$dir/cache/onnx-excite/"
echo "staged $spec for Python $py in $dir ($(du -sh "$dir" | cut -f1)):"
ls -l "$dir"/wheels "$dir"/parts 2>/dev/null || true
echo "next, on the GPU machine, in a copy of this checkout with $dir: bash scripts/device/install_offline.sh $dir [OUTDIR]"
