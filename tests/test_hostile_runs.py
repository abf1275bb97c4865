"""Hostile or careless runs, end to end through the CLI: a Ray address that does not answer,
a 1-channel model fed colour photos, output folders that cannot be created, names that try
to lead out of ``-o``, external data behind a symlink, crafted pickles, runs killed half way
and annotations that disagree with their images."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import ROOT, gap_classifier, tiny_model
from test_bad_input import _one_error, _run

PY = sys.executable


def _cli(*args, timeout=120, **kw):
    """The CLI in its own process (the real exit status, signals and wall time)."""
    return subprocess.run([PY, "-c", "from onnx_excite.cli.app import main; main()", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), **kw)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# 1. a Ray address that does not answer
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["explain", "eval"])
@pytest.mark.parametrize("address", ["unused-port", "nosuchhost.invalid:6379", "ray://nosuchhost.invalid:10001"])
def test_a_ray_address_that_does_not_answer_is_one_line_at_once(tmp_path, command, address):
    pytest.importorskip("ray")
    if address == "unused-port":
        address = f"127.0.0.1:{_unused_port()}"
    onnx.save(gap_classifier(2, 4, 2, 0), str(tmp_path / "gap.onnx"))
    Image.new("RGB", (20, 10), (200, 30, 30)).save(tmp_path / "p.png")
    if command == "explain":
        args = ["explain", tmp_path / "gap.onnx", tmp_path / "p.png", "-l", "r1"]
    else:
        args = ["eval", "pointing", "--data", tmp_path, "--model", tmp_path / "gap.onnx", "-l", "r1"]
    t0 = time.monotonic()
    res = _cli(*args, "-o", tmp_path / "o", "--ray", address, timeout=90)
    seconds = time.monotonic() - t0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach Ray at " + address), lines
    assert seconds < 30, seconds
    assert not (tmp_path / "o").exists()            # refused before any work


def test_ray_address_endpoints():
    from onnx_excite.apps.distributed import address_endpoint

    assert address_endpoint(None) is None and address_endpoint("local") is None and address_endpoint("auto") is None
    assert address_endpoint("head:6379") == ("head", 6379)
    assert address_endpoint("ray://10.0.0.2:10001") == ("10.0.0.2", 10001)
    assert address_endpoint("ray://[::1]:10001") == ("::1", 10001)
