#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU and onnxruntime-gpu installed in the
# active environment (pip install -e ".[gpu,test]" instead of ".[cpu,test]"; never both; or
# offline: scripts/device/install_offline.sh): the GPU's name and driver, ONNX Runtime's
# providers, the CUDA tests, then the device benchmark of docs/deploy.md (MobileNetV2 and a
# ResNet-50 shape, and MWP + c-MWP with the convolutions' adjoints batched over the sweeps).
# Usage: bash scripts/gpu_check.sh [OUTDIR]   (results: OUTDIR/gpu_check.txt)
set -uo pipefail
out="${1:-gpu_check_out}"
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
  python3 -c "from onnx_excite.run.devices import providers_for, preload_cuda; print('providers', providers_for('auto'), 'preload:', preload_cuda())"
  python3 -m pytest -q -rs tests/test_cuda_runtime.py tests/test_cuda_coverage.py
  onnx-excite bench-device default --device cuda --batch 1 --batch 32 --runs 50
  onnx-excite bench-device resnet50-random -l layer3 --device cuda --batch 1 --batch 32 --runs 50
  onnx-excite bench-device default --device cuda --batch 1 --batch 32 --runs 50 --share-adjoints all
} 2>&1 | tee "$out/gpu_check.txt"
