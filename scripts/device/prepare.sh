#!/usr/bin/env bash
# Stage scripts/gpu_check.sh for a GPU machine lent through the `device` tool. That machine
# has Python 3.12, PyTorch with the CUDA 13 / cuDNN 9 libraries as nvidia-* packages and the
# CPU onnxruntime 1.30, but no onnxruntime-gpu and no network, and one call carries at most
# 64 MiB, this checkout included. The onnxruntime-gpu wheel (256 MB) therefore goes over in
# parts, one per call, kept in /tmp on the warm machine between calls.
#
# Run here, in the checkout, with the project's venv active (the default model is built from
# the weights package). Writes .whl/ (git-ignored): p00, p01, ... (one wheel part each),
# cache/ (the default model, for XDG_CACHE_HOME there), meta/ (SHA256, small pure-Python wheels);
# prints the calls to make.
set -euo pipefail
cd "$(dirname "$0")/../.."
ver=$(python -c "import json; print(json.load(open('onnx_excite/data/cuda_kernels.json'))['onnxruntime_gpu'])")
rm -rf .whl && mkdir -p .whl/dl .whl/meta .whl/cache/onnx-excite
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl/dl "onnxruntime-gpu==$ver"
# pure-Python extras the GPU tests use that the image lacks (float16 export): small, in meta/
python -m pip download -q --no-deps --only-binary=:all: -d .whl/meta onnxconverter-common
wheel=$(ls .whl/dl/*.whl)
(cd .whl/dl && sha256sum -- *.whl) > .whl/meta/SHA256
# what travels with every call besides a part: the tracked files and the untracked, not ignored ones
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb -- | awk 'END {print $1}')
size=$(( 62 * 1024 * 1024 - tree ))   # 64 MiB less 2 MiB of slack
split -b "$size" -d -a 2 "$wheel" .whl/part
for f in .whl/part??; do n=${f##*part}; mkdir ".whl/p$n"; mv "$f" ".whl/p$n/part$n"; done
rm -rf .whl/dl
model=$(python -c "from onnx_excite.models.mobilenet_v2 import load_default_model as m; print(m())")
cp "$model" "$model.sha256" .whl/cache/onnx-excite/
echo "checkout $((tree / 1048576)) MiB; onnxruntime-gpu $ver in $(ls -d .whl/p?? | wc -l) parts of at most $((size / 1048576)) MiB"
echo "device calls, one after the other (the machine keeps /tmp only while warm, 30 s after a call):"
for d in .whl/p??; do
    echo "  run carry=[\"$d\"] timeout_s=120: mkdir -p /tmp/ortgpu && cp $d/* /tmp/ortgpu/ && ls -l /tmp/ortgpu"
done
echo "  run carry=[\".whl/cache\", \".whl/meta\"] timeout_s=540: bash scripts/device/gpu_run.sh"
