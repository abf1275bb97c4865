#!/usr/bin/env bash
# On the lent GPU machine, after the calls that scripts/device/prepare.sh printed have put the
# onnxruntime-gpu wheel's parts into /tmp/ortgpu: join and check the wheel, install it and this
# checkout into /tmp/site (no network: --no-index, the image's packages for the rest), point
# the CUDA provider at the image's CUDA 13 / cuDNN 9 libraries, run scripts/gpu_check.sh.
set -uo pipefail
out="${OUT:-gpu_check_out}"
read -r sum name < .whl/meta/SHA256
cat /tmp/ortgpu/part?? > "/tmp/$name" 2>/dev/null
if ! echo "$sum  /tmp/$name" | sha256sum -c --status; then
    echo "the wheel's parts in /tmp/ortgpu are missing or incomplete (a fresh machine?): $(ls /tmp/ortgpu 2>&1 | tr '\n' ' ')"
    exit 3
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "/tmp/$name" .whl/meta/*.whl || exit 4
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 5
# PYTHONSAFEPATH: the installed onnx_excite (with its cli and models subpackages), not ./onnx_excite
export PYTHONPATH=/tmp/site PYTHONSAFEPATH=1 PATH="/tmp/site/bin:$PATH" XDG_CACHE_HOME="$PWD/.whl/cache"
# preload_dlls looks for nvidia-* beside onnxruntime (now /tmp/site), so name their folders
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
