"""Prove that two checkouts of onnx-excite build bit-identical companion models.

The tool builds the companion model (forward graph + excitation branch) of a fixed,
deterministic set of cases with one checkout's code, runs each on ONNX Runtime's CPU
provider (one thread) with a fixed input and signal, and stores what came out. Comparing
the stores of two checkouts then shows, case by case, whether

* every output array is bit-identical (same names in the same order, dtype, shape, bytes),
* the same cases fail, with the same error type and message,
* the public fields of the built model agree (inputs, signal, logits, classes, maps ...),
* the serialized graphs are byte-identical (reported as a count only: node and tensor
  names inside the graph may differ while the results do not).

The cases: every graph of ``tests/test_export_ops.py``'s GRAPHS (seeds 0 and 1), the
residual / MobileNet / SE / zoo blocks of ``tests/test_blocks.py``, the nets of
``tests/method_nets.py``, the random-weight recipes of ``models/synthetic.py`` (tiny-cnn,
MobileNetV2, and ResNet-50 / VGG16 at 32 x 32 with a reduced method set) and 50 random
CNNs of ``tests/cnn_gen.py`` (seeds 0..49; odd seeds signed, every fifth without bias).
Each model is built for every method of ``METHODS`` alone, for ``("mwp", "cmwp")``
and for all methods but the CAM ones together, under both rules, at ``[input, mid]`` and
``[mid]`` (CAM and c-CAM also at the map the model's global pool reads), plus
channels + diagnostics, ``share_adjoints`` True / False, ``derive_weights=False``, an
explicit ``logits`` and a few refused requests (unknown layer, method, rule, logits).

Usage (each snapshot runs with the code of ``--repo``, default: the checkout holding
this script; its ``tests/`` supply the models)::

    python scripts/compare_companions.py snapshot OUT_DIR [--repo PATH]
    python scripts/compare_companions.py compare OLD_DIR NEW_DIR [--show N]

``snapshot`` writes one ``<case hash>.npz`` per case that ran and ``index.json``
(case id -> graph sha256, output names, error, ...). ``compare`` exits 0 only if every
case of either store is in both, every output is bit-identical and every error is the
same; the exit status is 1 otherwise. Snapshots of two checkouts are comparable when they
ran with the same onnx / onnxruntime / numpy versions on the same kind of CPU; ``compare``
warns where the recorded versions differ.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.abc
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FORMAT = 1
BATCH = 2
FREE_DIM = 32          # the size given to a symbolic non-batch input dim (H, W)
PAIR = ("mwp", "cmwp")


# ---------------------------------------------------------------------------
# running one checkout's code
# ---------------------------------------------------------------------------
class _RepoPackages(importlib.abc.MetaPathFinder):
    """Resolve the packages that pyproject.toml maps to other folders (``onnx_excite.cli``
    -> ``cli``, ``onnx_excite.models`` -> ``models``) inside the chosen checkout, ahead of
    any installed (e.g. editable) copy."""

    def __init__(self, mapping: dict[str, Path]):
        self.mapping = mapping

    def find_spec(self, fullname, path=None, target=None):
        folder = self.mapping.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def _package_dirs(repo: Path) -> dict[str, Path]:
    mapping = {"onnx_excite.cli": "cli", "onnx_excite.models": "models"}
    try:
        import tomllib

        with open(repo / "pyproject.toml", "rb") as f:
            mapping = tomllib.load(f).get("tool", {}).get("setuptools", {}).get("package-dir", mapping)
    except (ImportError, OSError, ValueError):
        pass
    return {name: repo / folder for name, folder in mapping.items() if name and (repo / folder).is_dir()}


def use_repo(repo: Path):
    """Import onnx_excite from ``repo`` (and the tests' model builders from its tests/)."""
    repo = repo.resolve()
    for name in list(sys.modules):
        if name == "onnx_excite" or name.startswith("onnx_excite."):
            raise SystemExit("onnx_excite was imported before --repo took effect")
    sys.path.insert(0, str(repo / "tests"))
    sys.path.insert(0, str(repo))
    sys.meta_path.insert(0, _RepoPackages(_package_dirs(repo)))
    import onnx_excite

    check_modules(repo)
    return onnx_excite


def check_modules(repo: Path) -> None:
    """Every imported onnx_excite module comes from ``repo``."""
    for name, module in list(sys.modules.items()):
        if name == "onnx_excite" or name.startswith("onnx_excite."):
            file = getattr(module, "__file__", None)
            if file is not None:
                assert Path(file).resolve().is_relative_to(repo), f"{name} imported from {file}, not from {repo}"


def _git(repo: Path, *args) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------
def _models():
    """[(model id, model, candidate layers, family)] in a fixed order; family "big"
    gets a reduced case set."""
    import cnn_gen
    import method_nets
    import test_blocks
    import test_export_ops
    from onnx_excite.models import synthetic

    out = []
    for name in sorted(test_export_ops.GRAPHS):
        for seed in (0, 1):
            model, layers = test_export_ops.GRAPHS[name](seed)[:2]
            out.append((f"export/{name}/s{seed}", model, layers, "export"))
    zoo = {**test_blocks.BLOCKS, **test_blocks.ZOO}
    for name in sorted(zoo):
        for seed in (0, 1):
            model, layers = zoo[name](seed)
            out.append((f"blocks/{name}/s{seed}", model, layers, "blocks"))
    for kind in ("concat", "reduce_mean", "plain", "signed", "residual", "nobias"):
        for seed in (0, 1):
            model, layers = method_nets.net(kind, seed)
            out.append((f"method_nets/{kind}/s{seed}", model, layers, "method_nets"))
    out.append(("synthetic/tiny-cnn", synthetic.tiny_cnn(0), ["input", "relu1", "pool1"], "synthetic"))
    out.append(("synthetic/mobilenetv2-random", synthetic.mobilenet_v2(0, num_classes=10),
                ["input", "features.13"], "synthetic"))
    out.append(("synthetic/resnet50-random", synthetic.resnet50(0, num_classes=10), ["input", "layer3"], "big"))
    out.append(("synthetic/vgg16-random-32", synthetic.vgg16(0, num_classes=10, size=32), ["input", "pool4"], "big"))
    for seed in range(50):
        signed, bias = seed % 2 == 1, seed % 5 != 3
        model, layers = cnn_gen.random_cnn(seed, bias=bias, signed=signed)
        out.append((f"random/s{seed}" + ("-signed" if signed else "") + ("" if bias else "-nobias"), model, layers,
                    "random"))
    return out


def _feature_map(model) -> str | None:
    """The input of the model's last global pool (GlobalAveragePool or ReduceMean): where
    CAM is defined when a linear classifier reads that pool."""
    pools = [n for n in model.graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    return pools[-1].input[0] if pools else None


def _logits_tensor(model) -> str:
    last = model.graph.node[-1]
    if last.op_type in ("Softmax", "LogSoftmax") and model.graph.output[0].name == last.output[0]:
        return last.input[0]
    return model.graph.output[0].name


def _case(model_id, model, ms, ls, rule="positive", **options):
    """(case id, model id, model, build kwargs); the id names everything the case varies."""
    opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    cid = f"{model_id}|{'+'.join(ms)}|{rule}|{','.join(ls)}" + (f"|{opts}" if opts else "")
    return cid, model_id, model, dict(layers=list(ls), methods=list(ms), rule=rule, **options)


def cases(methods):
    """Yield (case id, model id, model, build kwargs) in a fixed order."""
    singles = [(m,) for m in methods]
    together = tuple(m for m in methods if not m.endswith("cam"))
    method_sets = singles + [PAIR, together]
    cam_like = [m for m in methods if m.endswith("cam")]
    probed = set()
    for model_id, model, layers, family in _models():
        mid = layers[len(layers) // 2] if len(layers) > 1 else layers[0]
        layer_sets = [[layers[0], mid], [mid]] if mid != layers[0] else [[mid]]
        rules = ("positive",) if family == "big" else ("positive", "paper")
        case = functools.partial(_case, model_id, model)
        for rule in rules:
            for ls in layer_sets if family != "big" else layer_sets[:1]:
                for ms in method_sets:
                    yield case(ms, ls, rule)
            feature = _feature_map(model)
            if feature is not None and all([feature] != ls for ls in layer_sets):
                for m in cam_like:
                    yield case((m,), [feature], rule)
            if family != "big":
                for ms in (PAIR, together):
                    yield case(ms, layer_sets[0], rule, channels=True, diagnostics=True)
        if family == "big":
            yield case(PAIR, layer_sets[0], "positive", channels=True, diagnostics=True)
            continue
        for ms in (PAIR, together):
            yield case(ms, layer_sets[0], "positive", share_adjoints=True)
            yield case(ms, layer_sets[0], "positive", share_adjoints=False)
            yield case(ms, layer_sets[0], "positive", derive_weights=False)
        yield case(PAIR, layer_sets[0], "positive", logits=_logits_tensor(model))
        if family not in probed:   # refused requests, once per family
            probed.add(family)
            yield case(PAIR, ["no_such_layer"])
            yield case(("center",), [mid])
            yield case(PAIR, [mid], "alpha")
            yield case((), [mid])
            yield case(PAIR, [mid], "positive", logits="no_such_logits")


# ---------------------------------------------------------------------------
# snapshot
# ---------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _input_array(value_info, seed: int) -> np.ndarray:
    """Sample 0 non-negative, sample 1 signed (uint8 models: raw pixels)."""
    from onnx import TensorProto, helper

    dims = _dims(value_info)
    shape = [BATCH] + [d if d else FREE_DIM for d in dims[1:]]
    rng = np.random.default_rng(seed)
    elem = value_info.type.tensor_type.elem_type
    if elem == TensorProto.UINT8:
        return rng.integers(0, 256, size=shape).astype(np.uint8)
    x = rng.normal(size=shape)
    x[0] = np.abs(x[0])
    return x.astype(helper.tensor_dtype_to_np_dtype(elem))


def _signal(num_classes: int, seed: int) -> np.ndarray:
    """Row 0 one-hot (class seed mod K), row 1 uniform in [0, 1)."""
    rng = np.random.default_rng(seed + 1000)
    s = np.zeros((BATCH, num_classes), np.float32)
    s[0, seed % num_classes] = 1.0
    s[1] = rng.random(num_classes).astype(np.float32)
    return s


def _session(model_bytes: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.use_deterministic_compute = True
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _error(e: BaseException, excite_error) -> dict:
    return {"type": type(e).__name__, "message": str(e), "excite": isinstance(e, excite_error)}


def _meta(built) -> dict:
    fields = {}
    for name in ("inputs", "signal", "logits", "num_classes", "layers", "methods", "rule", "classifier"):
        value = getattr(built, name, None)
        fields[name] = list(value) if isinstance(value, tuple) else value
    for name in ("maps", "channels", "masses"):
        fields[name] = sorted([list(k), v] for k, v in (getattr(built, name, None) or {}).items())
    return fields


def run_case(onnx_excite, model, kwargs, seed: int) -> tuple[dict, dict]:
    """(index entry, {output name: array}) of one case."""
    before = model.SerializeToString(deterministic=True)
    entry: dict = {"model_sha256": _sha(before)}
    try:
        built = onnx_excite.build_excitation_model(model, **kwargs)
    except Exception as e:  # noqa: BLE001 - a refused build is a result to compare
        entry["error"] = _error(e, onnx_excite.ExciteError)
        entry["model_unchanged"] = model.SerializeToString(deterministic=True) == before
        return entry, {}
    entry["model_unchanged"] = model.SerializeToString(deterministic=True) == before
    companion = built.model
    data = companion.SerializeToString(deterministic=True)
    entry["graph_sha256"] = _sha(data)
    entry["outputs"] = [o.name for o in companion.graph.output]
    entry["meta"] = _meta(built)
    inits = {t.name for t in companion.graph.initializer}
    feeds = {}
    forward = {vi.name: vi for vi in model.graph.input}
    for i, vi in enumerate(vi for vi in companion.graph.input if vi.name not in inits):
        if vi.name == onnx_excite.SIGNAL:
            k = _dims(vi)[1] if len(_dims(vi)) == 2 and _dims(vi)[1] else built.num_classes
            feeds[vi.name] = _signal(int(k), seed)
        else:
            feeds[vi.name] = _input_array(forward.get(vi.name, vi), seed + i)
    entry["feeds_sha256"] = _sha(b"".join(name.encode() + a.tobytes() for name, a in sorted(feeds.items())))
    try:
        sess = _session(data)
        names = [o.name for o in sess.get_outputs()]
        values = sess.run(names, feeds)
    except Exception as e:  # noqa: BLE001
        entry["run_error"] = _error(e, onnx_excite.ExciteError)
        return entry, {}
    entry["run_outputs"] = names
    return entry, dict(zip(names, values))


def case_file(case_id: str) -> str:
    return hashlib.sha1(case_id.encode()).hexdigest()[:20] + ".npz"


def snapshot(out_dir: Path, repo: Path) -> int:
    onnx_excite = use_repo(repo)
    import onnx
    import onnxruntime

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    index: dict = {}
    errors = {"refused": 0, "other": 0, "run": 0}
    for n, (cid, model_id, model, kwargs) in enumerate(cases(list(onnx_excite.METHODS)), start=1):
        assert cid not in index, f"duplicate case id {cid}"
        seed = int(hashlib.sha1(model_id.encode()).hexdigest()[:8], 16)   # the same wherever the model is listed
        entry, outputs = run_case(onnx_excite, model, kwargs, seed)
        if "error" in entry:
            errors["refused" if entry["error"]["excite"] else "other"] += 1
        errors["run"] += "run_error" in entry
        if outputs:
            entry["file"] = case_file(cid)
            arrays = {f"o{i}": np.asarray(v) for i, v in enumerate(outputs.values())}
            np.savez(out_dir / entry["file"], **arrays)
        index[cid] = entry
        if n % 50 == 0:
            print(f"{n} cases, {time.time() - start:.0f} s", flush=True)
    check_modules(repo.resolve())
    header = {
        "format": FORMAT,
        "repo": str(repo.resolve()),
        "commit": _git(repo, "rev-parse", "HEAD"),
        "dirty": bool(_git(repo, "status", "--porcelain", "--untracked-files=no")),
        "onnx_excite": onnx_excite.__file__,
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "machine": platform.machine(),
        "seconds": round(time.time() - start, 1),
    }
    with open(out_dir / "index.json", "w") as f:
        json.dump({"header": header, "cases": index}, f, indent=1, sort_keys=True)
    print(f"{len(index)} cases in {header['seconds']} s -> {out_dir}: {errors['refused']} refused (ExciteError), "
          f"{errors['other']} other build errors, {errors['run']} run errors")
    return 0


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------
def _load(store: Path) -> dict:
    with open(store / "index.json") as f:
        data = json.load(f)
    if data.get("header", {}).get("format") != FORMAT:
        raise SystemExit(f"{store}: not a snapshot of this tool's format {FORMAT}")
    return data


def _arrays(store: Path, entry: dict) -> list[np.ndarray]:
    if "file" not in entry:
        return []
    with np.load(store / entry["file"]) as z:
        return [z[f"o{i}"] for i in range(len(z.files))]


def _array_diff(a: np.ndarray, b: np.ndarray) -> str | None:
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    if a.tobytes() == b.tobytes():
        return None
    if a.dtype.kind in "fc":
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        finite = np.isfinite(diff)
        worst = float(diff[finite].max()) if finite.any() else float("nan")
        scale = float(np.abs(a[np.isfinite(a)]).max()) if np.isfinite(a).any() else 0.0
        if np.array_equal(a, b, equal_nan=True):
            return "bytes differ but values are equal (signed zeros or NaN payloads)"
        unequal = int(np.count_nonzero(~((a == b) | (np.isnan(a) & np.isnan(b)))))
        return f"{unequal} of {a.size} values differ, max |diff| {worst:.3g} (max |old| {scale:.3g})"
    return f"{int(np.count_nonzero(a != b))} of {a.size} values differ"


def compare_entries(old_dir: Path, new_dir: Path, old: dict, new: dict) -> list[str]:
    """The differences that make two cases unequal (empty: equal)."""
    problems = []
    if old.get("model_sha256") != new.get("model_sha256"):
        problems.append("the source model differs (tests/ builders changed): the case is not comparable")
    if old.get("feeds_sha256") != new.get("feeds_sha256") and "feeds_sha256" in old and "feeds_sha256" in new:
        problems.append("the inputs fed differ")
    for key in ("error", "run_error"):
        if old.get(key) != new.get(key):
            problems.append(f"{key}: {old.get(key)} vs {new.get(key)}")
    if old.get("model_unchanged") != new.get("model_unchanged"):
        problems.append(f"source model left unchanged: {old.get('model_unchanged')} vs {new.get('model_unchanged')}")
    if old.get("outputs") != new.get("outputs"):
        problems.append(f"graph outputs {old.get('outputs')} vs {new.get('outputs')}")
    for field in sorted(set(old.get("meta", {})) | set(new.get("meta", {}))):
        a, b = old.get("meta", {}).get(field), new.get("meta", {}).get(field)
        if a != b:
            problems.append(f"built.{field}: {a!r} vs {b!r}")
    if old.get("run_outputs") != new.get("run_outputs"):
        problems.append(f"session outputs {old.get('run_outputs')} vs {new.get('run_outputs')}")
        return problems
    names = old.get("run_outputs") or []
    a_list, b_list = _arrays(old_dir, old), _arrays(new_dir, new)
    if len(a_list) != len(names) or len(b_list) != len(names):
        problems.append(f"stored arrays: {len(a_list)} vs {len(b_list)} for {len(names)} outputs")
        return problems
    for name, a, b in zip(names, a_list, b_list, strict=True):
        diff = _array_diff(a, b)
        if diff:
            problems.append(f"output {name!r}: {diff}")
    return problems


def compare(old_dir: Path, new_dir: Path, show: int = 20) -> int:
    old, new = _load(old_dir), _load(new_dir)
    oh, nh = old["header"], new["header"]
    print(f"old: {oh['repo']} {oh.get('commit') or '?'}{' (dirty)' if oh.get('dirty') else ''}")
    print(f"new: {nh['repo']} {nh.get('commit') or '?'}{' (dirty)' if nh.get('dirty') else ''}")
    for key in sorted(set(oh["versions"]) | set(nh["versions"])):
        if oh["versions"].get(key) != nh["versions"].get(key):
            print(f"warning: {key} {oh['versions'].get(key)} vs {nh['versions'].get(key)}: "
                  "outputs may differ for that reason alone")
    oc, nc = old["cases"], new["cases"]
    only_old, only_new = sorted(set(oc) - set(nc)), sorted(set(nc) - set(oc))
    common = [c for c in oc if c in nc]
    failed, graph_differs, arrays = {}, 0, 0
    for cid in common:
        problems = compare_entries(old_dir, new_dir, oc[cid], nc[cid])
        if problems:
            failed[cid] = problems
        if oc[cid].get("graph_sha256") != nc[cid].get("graph_sha256"):
            graph_differs += 1
        arrays += len(oc[cid].get("run_outputs") or [])
    for label, ids in (("only in old", only_old), ("only in new", only_new)):
        if ids:
            print(f"{len(ids)} cases {label}:")
            for cid in ids[:show]:
                print(f"  {cid}")
    if failed:
        print(f"{len(failed)} cases differ:")
        for cid in list(failed)[:show]:
            print(f"  {cid}")
            for p in failed[cid]:
                print(f"    {p}")
        if len(failed) > show:
            print(f"  ... and {len(failed) - show} more (--show N)")
    built = sum(1 for c in common if "graph_sha256" in oc[c])
    print(f"{len(common)} cases compared ({built} built, {len(common) - built} refused), {arrays} output arrays: "
          f"{len(common) - len(failed)} identical, {len(failed)} differ, "
          f"{len(only_old) + len(only_new)} missing on one side")
    print(f"graph bytes: {built - graph_differs} of {built} identical"
          + (f"; warning: {graph_differs} serialized graphs differ (names may; the results above decide)"
             if graph_differs else ""))
    ok = not failed and not only_old and not only_new
    print("IDENTICAL" if ok else "DIFFERENT")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot", help="build and run every case with one checkout's code")
    snap.add_argument("out_dir", type=Path)
    snap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                      help="the checkout whose onnx_excite and tests/ to use (default: the one holding this script)")
    comp = sub.add_parser("compare", help="compare two snapshots; exit 0 only if all results are identical")
    comp.add_argument("old_dir", type=Path)
    comp.add_argument("new_dir", type=Path)
    comp.add_argument("--show", type=int, default=20, help="list at most N differing cases (default 20)")
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        return snapshot(args.out_dir, args.repo)
    return compare(args.old_dir, args.new_dir, args.show)


if __name__ == "__main__":
    sys.exit(main())
