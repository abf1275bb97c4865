"""Device benchmark: batch-1 latency, batch-N throughput and peak device memory of the
forward alone vs forward+MWP vs forward+c-MWP, on the providers really in use.

Inputs are uploaded once and outputs stay on the device (I/O binding), so on CUDA the
figures are the GPU's, not PCIe copies. Peak memory on CUDA is read from ``nvidia-smi``
(this process's used memory, polled after every run, minus what it used before the
variant's session existed; each session has its own arena, freed when it is dropped).
On the CPU provider memory is not reported.
"""
from __future__ import annotations

import gc
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..graph.builder import build_excitation_model
from ..graph.canonicalize import canonicalize
from ..graph.options import given
from ..run.devices import CUDA, check_providers, providers_for
from ..run.ort import import_ort
from ..run.runtime import make_session
from .bench import BenchOptions



@dataclass(frozen=True)
class DeviceBenchOptions(BenchOptions):
    """:class:`~onnx_excite.apps.bench.BenchOptions` on a device: ``device`` (cpu / cuda / auto)
    picks the providers, each variant runs at every batch size of ``batches``."""

    device: str = "auto"
    batches: Sequence[int] = (1, 32)
    runs: int = 20
    warmup: int = 3


@dataclass
class DeviceRow:
    variant: str
    batch: int
    median_ms: float
    images_per_s: float
    throughput_ratio: float          # images/s relative to the forward alone at this batch
    peak_mib: float | None           # device memory of the session (CUDA only)
    memory_ratio: float | None


def device_memory_mib() -> float | None:
    """This process's GPU memory (MiB) from nvidia-smi, or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    pid = str(os.getpid())
    used = [float(parts[1]) for parts in (line.split(",") for line in text.splitlines()) if parts[0].strip() == pid]
    return sum(used) if used else 0.0


def _measure(session, feeds: dict, outputs: list[str], runs: int, warmup: int, on_cuda: bool):
    ort = import_ort()
    device = "cuda" if on_cuda else "cpu"
    binding = session.io_binding()
    for name, array in feeds.items():   # uploaded once, kept on the device
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for name in outputs:
        binding.bind_output(name, device, 0)
    times, peak = [], 0.0
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)
        if on_cuda:
            binding.synchronize_outputs()
        dt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(dt)
        if on_cuda:
            peak = max(peak, device_memory_mib() or 0.0)
    return float(np.median(times)), peak


def run_device_bench(model, layers: Sequence[str] | None = None, *, options: DeviceBenchOptions | None = None,
                     **fields) -> tuple[list[DeviceRow], list[str]]:
    """Rows per (variant, batch) and the providers in use; the settings are a
    :class:`DeviceBenchOptions` (``options``), ``layers`` and keyword ``fields`` replacing what
    it holds (``variants``: the forward and the methods timed; the rule, input shapes and
    ``share_adjoints`` go to the builder)."""
    opts = DeviceBenchOptions.of(options, **given(layers=layers), **fields)
    device = opts.device
    requested = providers_for(device)
    rng = np.random.default_rng(opts.seed)
    forward = canonicalize(model, input_shapes=opts.input_shapes)
    rows: list[DeviceRow] = []
    used: list[str] = []
    for batch in opts.batches:
        base_tp = base_mem = None
        for name, methods in opts.variants:
            gc.collect()
            before = device_memory_mib() if CUDA in requested else None
            if methods is None:
                session = make_session(forward.forward_model(), requested)
                outputs, signal_name, k = [forward.entry], None, None
            else:
                built = build_excitation_model(model, options=opts.build(methods))
                session = make_session(built.model, requested)
                outputs = [built.logits] + list(built.maps.values())
                signal_name, k = built.signal, built.num_classes or session.get_inputs()[-1].shape[1]
            used = check_providers(requested, session) if device == "cuda" else list(session.get_providers())
            on_cuda = CUDA in used
            feeds = {}
            for inp in session.get_inputs():
                if inp.name == signal_name:
                    sig = np.zeros((batch, k), np.float32)
                    sig[:, 0] = 1.0
                    feeds[inp.name] = sig
                else:
                    dims = [batch] + [d if isinstance(d, int) and d > 0 else 224 for d in inp.shape[1:]]
                    feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
            ms, peak = _measure(session, feeds, outputs, opts.runs, opts.warmup, on_cuda)
            tp = batch / (ms / 1e3)
            mem = (peak - (before or 0.0)) if on_cuda and before is not None else None
            if methods is None:
                base_tp, base_mem = tp, mem
            rows.append(DeviceRow(name, batch, ms, tp, tp / base_tp,
                                  mem, (mem / base_mem) if mem is not None and base_mem else None))
            del session
    return rows, used
