"""Device selection: ``cpu``, ``cuda`` or ``auto`` -> ONNX Runtime providers, with no silent fallback.

ONNX Runtime quietly runs on the CPU when the CUDA provider cannot start (no GPU, missing
CUDA libraries, the CPU-only wheel). :func:`providers_for` refuses ``cuda`` when this
onnxruntime build does not list it, and :func:`check_providers` refuses a session that
dropped it; ``auto`` takes CUDA when it works and says which providers are in use.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ExciteError
from .ort import import_ort

DEVICES = ("auto", "cpu", "cuda")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class DeviceUnavailableError(ExciteError):
    """CUDA was asked for and is not available."""


#: what ONNX Runtime's ``preload_dlls`` reported (it prints; the library does not), once per process
_preload_report: list[str] | None = None


def preload_cuda() -> list[str]:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu needs from where pip put them
    (``pip install 'onnxruntime-gpu[cuda,cudnn]'``: the nvidia-* packages beside it), or
    from the default library paths, before the first CUDA session: the CUDA provider looks
    only in the default paths otherwise, and ONNX Runtime then runs on the CPU. ORT's own
    ``preload_dlls`` (1.21+) does it; it prints what failed, so its output is kept here, for
    the error line when a session drops CUDA. Once per process; a CPU build returns at once."""
    global _preload_report
    if _preload_report is None:
        import contextlib
        import io

        ort = import_ort()
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                if hasattr(ort, "preload_dlls"):
                    ort.preload_dlls()
        except Exception as exc:   # e.g. a library folder that does not exist
            out.write(f"{type(exc).__name__}: {exc}\n")
        _preload_report = [line.strip() for line in out.getvalue().splitlines() if line.strip()]
    return _preload_report


def providers_for(device: str) -> list[str]:
    """The provider list for a device name (``auto``: CUDA first when this build has it)."""
    if device not in DEVICES:
        raise ExciteError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    available = import_ort().get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda" and CUDA not in available:
        raise DeviceUnavailableError(
            "--device cuda: this onnxruntime has no CUDA provider (available: " + ", ".join(available)
            + "); install the GPU build: pip install 'onnx-excite[gpu]' (and uninstall onnxruntime)")
    if CUDA in available:
        preload_cuda()
        return [CUDA, CPU]
    return [CPU]


def check_providers(requested: Sequence[str], session) -> list[str]:
    """The providers the session really uses; raise when it silently dropped CUDA."""
    used = list(session.get_providers())
    if CUDA in requested and CUDA not in used:
        failed = [line for line in (_preload_report or []) if line.lower().startswith(("failed", "runtimeerror"))]
        why = f" ({failed[0][:200]})" if failed else ""
        raise DeviceUnavailableError(
            "CUDA was asked for but ONNX Runtime could not start it (no GPU visible, or the CUDA/cuDNN "
            f"libraries are missing{why}); providers in use: {', '.join(used)}. Use --device cpu to run on the CPU")
    return used


def describe(providers: Sequence[str]) -> str:
    """One line naming the providers in use."""
    return "providers: " + ", ".join(providers)


class BoundRunner:
    """Runs a session through ORT's I/O binding with device buffers kept between batches.

    Per input shape, the first run allocates the inputs (image batch, signal) and outputs
    on the session's device; later batches of that shape copy their inputs into the same
    device buffers (one upload each: the images and the signal) and ORT writes the outputs
    into the same output buffers, which are copied to the host once per run. On the CPU
    provider it is the same data path without copies to a device.
    """

    def __init__(self, session, outputs: Sequence[str]):
        self.session, self.outputs = session, list(outputs)
        self.device = "cuda" if CUDA in session.get_providers() else "cpu"
        self._bound: dict = {}

    def __call__(self, feeds: dict) -> list:
        ort = import_ort()
        key = tuple((name, a.shape, a.dtype.str) for name, a in sorted(feeds.items()))
        entry = self._bound.get(key)
        if entry is None:
            binding = self.session.io_binding()
            inputs = {name: ort.OrtValue.ortvalue_from_numpy(a, self.device, 0) for name, a in feeds.items()}
            for name, value in inputs.items():
                binding.bind_ortvalue_input(name, value)
            for name in self.outputs:
                binding.bind_output(name, self.device, 0)
            self.session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            for name, value in zip(self.outputs, outputs):   # reuse these buffers from now on
                binding.bind_ortvalue_output(name, value)
            self._bound[key] = (binding, inputs, outputs)
        else:
            binding, inputs, outputs = entry
            for name, a in feeds.items():
                inputs[name].update_inplace(np.ascontiguousarray(a))
            self.session.run_with_iobinding(binding)
        # a copy: the next batch overwrites the buffers (on CUDA .numpy() copies to the host)
        return [np.array(v.numpy(), copy=True) for v in outputs]

