"""Device selection: ``cpu``, ``cuda`` or ``auto`` -> ONNX Runtime providers, with no silent fallback.

ONNX Runtime quietly runs on the CPU when the CUDA provider cannot start (no GPU, missing
CUDA libraries, the CPU-only wheel). :func:`providers_for` refuses ``cuda`` when this
onnxruntime build does not list it, and :func:`check_providers` refuses a session that
dropped it; ``auto`` takes CUDA when it works and says which providers are in use.
"""
from __future__ import annotations

from typing import Sequence

from .errors import ExciteError

DEVICES = ("auto", "cpu", "cuda")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class DeviceUnavailableError(ExciteError):
    """CUDA was asked for and is not available."""


def providers_for(device: str) -> list[str]:
    """The provider list for a device name (``auto``: CUDA first when this build has it)."""
    from .runtime import import_ort

    if device not in DEVICES:
        raise ExciteError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    available = import_ort().get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda" and CUDA not in available:
        raise DeviceUnavailableError(
            "--device cuda: this onnxruntime has no CUDA provider (available: " + ", ".join(available)
            + "); install the GPU build: pip install 'onnx-excite[gpu]' (and uninstall onnxruntime)")
    return ([CUDA] if CUDA in available else []) + [CPU]


def check_providers(requested: Sequence[str], session) -> list[str]:
    """The providers the session really uses; raise when it silently dropped CUDA."""
    used = list(session.get_providers())
    if CUDA in requested and CUDA not in used:
        raise DeviceUnavailableError(
            "CUDA was asked for but ONNX Runtime could not start it (no GPU visible, or the CUDA/cuDNN "
            f"libraries are missing); providers in use: {', '.join(used)}. Use --device cpu to run on the CPU")
    return used


def describe(providers: Sequence[str]) -> str:
    """One line naming the providers in use."""
    return "providers: " + ", ".join(providers)


def run_bound(session, feeds: dict, outputs: Sequence[str]) -> list:
    """One run through ORT's I/O binding: each input is copied to the session's device once
    (the image batch and the signal), the outputs are allocated there and copied back once.
    On the CPU provider this is the same data path, with no copies."""
    device = "cuda" if CUDA in session.get_providers() else "cpu"
    binding = session.io_binding()
    from .runtime import import_ort

    ort = import_ort()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for name in outputs:
        binding.bind_output(name, device, 0)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()
