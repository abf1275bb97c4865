"""Explain and evaluate whole datasets on a Ray cluster (optional extra ``ray``).

The pipeline is Ray Data's batch-inference pattern:

1. the driver lists the inputs (local files, folders, globs, or any URI pyarrow's filesystems
   read: ``s3://``, ``gs://``, ...) and drops the images a previous run completed;
2. ``map`` tasks on CPU workers read and decode each image and preprocess it (an unreadable
   image becomes a row with its error, counted and skipped as in one process);
3. ``map_batches`` with a callable class: each actor builds its model state once (the resolved
   model travels once through the object store; one companion graph per input shape, kept
   for the actor's life) and computes the maps, writes the per-image outputs and returns one
   small row per image;
4. the driver collects the rows in input order: for ``explain`` it appends each record to
   ``explanations.jsonl`` as it arrives (an interrupted run keeps what finished) and rewrites
   the file in input order at the end; for ``eval`` it assembles the same
   :class:`~onnx_excite.apps.eval.EvalResult` as the single-process run.

A worker process that dies is restarted by Ray and its batch run again (``max_restarts``);
an error of the model itself (unknown layer, ORT failure) stops the job with its message.
Outputs are written by the workers to the output folder: on a multi-machine cluster it must be
a folder every node sees (a shared file system).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import ExciteError

RAY_HINT = "Ray is not installed: pip install 'onnx-excite[ray]'"
#: CPUs each decode task reserves (the model actors must leave at least this much free)
DECODE_CPUS = 0.5


@dataclass
class RaySettings:
    """Where and how wide to run.

    ``address``: None or ``"local"`` starts a local Ray instance (``num_cpus`` CPUs, default
    all); ``"auto"`` joins the cluster this machine belongs to; ``"ray://host:10001"`` connects
    to a remote head through Ray Client. ``actors``: model workers; ``batch_size``: rows per
    actor call; ``cpus_per_actor`` / ``gpus_per_actor``: resources each actor reserves (its
    ONNX Runtime threads follow ``cpus_per_actor``); ``max_restarts``: times a dead actor is
    restarted (its batch retried) before the job fails.
    """

    address: Optional[str] = None
    actors: int = 2
    batch_size: int = 8
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    num_cpus: Optional[int] = None
    max_restarts: int = 3

    def check(self) -> None:
        if self.actors < 1:
            raise ExciteError("--actors must be at least 1")
        if self.batch_size < 1:
            raise ExciteError("the Ray batch size must be at least 1")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ExciteError("--cpus-per-actor must be > 0 and --gpus-per-actor >= 0")


@dataclass
class RunStats:
    """What a distributed run did: images in the job, done now, failed, already done before."""

    images: int = 0
    done: int = 0
    failed: int = 0
    resumed: int = 0
    seconds: float = 0.0
    errors: list = field(default_factory=list)    # (image, reason)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ExciteError(RAY_HINT) from None
    return ray


#: seconds to wait for a Ray address to accept a TCP connection before giving up
REACH_TIMEOUT = 3.0


def address_endpoint(address: Optional[str]) -> Optional[tuple]:
    """``(host, port)`` of a Ray address that names one (``host:port`` or ``ray://host:port``);
    None for a local instance and for ``auto`` (Ray finds that cluster itself, and says at once
    when there is none)."""
    if address in (None, "", "local", "auto"):
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]")
    return host or "127.0.0.1", int(port)


def check_reachable(address: Optional[str], timeout: float = REACH_TIMEOUT) -> None:
    """One TCP connection to the host and port a Ray address names, before ``ray.init`` (which
    otherwise retries an address that does not answer for minutes, warning all the while):
    ExciteError when the host cannot be resolved or the port does not answer within ``timeout``."""
    endpoint = address_endpoint(address)
    if endpoint is None:
        return
    import socket

    host, port = endpoint
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise ExciteError(f"cannot reach Ray at {address}: unknown host {host!r} ({exc.strerror or exc})") from None
    last = None
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
            return
        except OSError as exc:
            last = exc
    reason = "no answer" if isinstance(last, socket.timeout) else (getattr(last, "strerror", None) or str(last))
    raise ExciteError(f"cannot reach Ray at {address}: {host}:{port} does not accept connections "
                      f"({reason} within {timeout:g} s)") from None


def connect(settings: RaySettings):
    """Start or join Ray as ``settings.address`` says (nothing when already connected)."""
    ray = import_ray()
    settings.check()
    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True   # a worker's ExciteError reaches us as itself
    if ray.is_initialized():
        return ray
    address = settings.address
    check_reachable(address)
    try:
        if address in (None, "", "local"):
            ray.init(num_cpus=settings.num_cpus, include_dashboard=False, configure_logging=False)
        else:
            ray.init(address=address, configure_logging=False)
    except Exception as exc:
        raise ExciteError(f"cannot start or reach Ray at {address or 'a local instance'}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    ctx.enable_progress_bars = True
    return ray


def _check_resources(ray, settings: RaySettings) -> None:
    """Actors hold their CPUs for the whole job: if they take them all, no decode task can run."""
    total = float(ray.cluster_resources().get("CPU", 0))
    need = settings.actors * settings.cpus_per_actor + DECODE_CPUS
    if need > total + 1e-9:
        raise ExciteError(f"{settings.actors} actor(s) x {settings.cpus_per_actor:g} CPU + {DECODE_CPUS:g} CPU to decode "
                          f"images need {need:g} CPUs; the Ray cluster has {total:g}: lower --actors or "
                          f"--cpus-per-actor (e.g. 0.5)")
    if settings.gpus_per_actor and settings.actors * settings.gpus_per_actor > float(ray.cluster_resources().get("GPU", 0)):
        raise ExciteError(f"{settings.actors} actor(s) x {settings.gpus_per_actor:g} GPU: the Ray cluster has "
                          f"{ray.cluster_resources().get('GPU', 0):g} GPU(s)")


def _actor_args(settings: RaySettings) -> dict:
    # max_restarts / max_task_retries go through map_batches' **ray_remote_args: deprecated in
    # Ray 2.60 with no named replacement, removed in 2.64, hence the extra's pin ray < 2.64
    ray = import_ray()
    _check_resources(ray, settings)
    return dict(compute=ray.data.ActorPoolStrategy(size=settings.actors), batch_size=settings.batch_size,
                num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor or None,
                max_restarts=settings.max_restarts, max_task_retries=settings.max_restarts, batch_format="numpy")


def _num_blocks(n: int, settings: RaySettings) -> int:
    """Input blocks: enough for every actor to have work queued, about four actor batches each
    (a decode task handles one block), at most 10 000."""
    per_block = 4 * settings.batch_size
    return max(1, min(n, max(8 * settings.actors, min(-(-n // per_block), 10_000))))


def _unwrap(exc: BaseException) -> Optional[ExciteError]:
    """The ExciteError a worker raised, out of Ray's wrapping, if that is what stopped the job."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(exc, ExciteError) and not isinstance(cause, BaseException):
            return ExciteError(str(exc).strip().splitlines()[0])   # without Ray's advice on retries
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return None


def _collect(ds, on_row: Callable[[dict], None]) -> None:
    try:
        for row in ds.iter_rows():
            on_row(row)
    except ExciteError:
        raise
    except Exception as exc:
        inner = _unwrap(exc)
        if inner is not None:
            raise inner from None
        raise ExciteError(f"the Ray job failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}") from None


# ---------------------------------------------------------------------------
# inputs: local paths and URIs
# ---------------------------------------------------------------------------
def is_uri(text: str) -> bool:
    return "://" in str(text)


class UriPath(str):
    """A URI that answers ``.stem`` and ``.name`` like a Path (outputs are named after it)."""

    @property
    def name(self) -> str:
        return PurePosixPath(self.split("://", 1)[1]).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.split("://", 1)[1]).stem


def _filesystem(uri: str):
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as exc:
        raise ExciteError(f"{uri}: cannot open this location ({str(exc).splitlines()[0]})") from None


def list_inputs(inputs: Sequence) -> list:
    """Image paths (local: as :func:`explain.expand_inputs`) and URIs (a file, a folder's image
    files, or a glob in the last part), in order."""
    from pyarrow import fs

    from .explain import IMAGE_SUFFIXES, expand_inputs

    out = []
    for item in map(str, inputs):
        if not is_uri(item):
            out.extend(expand_inputs([Path(item)]))
            continue
        scheme = item.split("://", 1)[0]
        filesystem, path = _filesystem(item)
        pattern = None
        if any(ch in path for ch in "*?["):
            path, pattern = path.rsplit("/", 1) if "/" in path else ("", path)
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.File and pattern is None:
            out.append(UriPath(item))
            continue
        if info.type != fs.FileType.Directory:
            raise ExciteError(f"{item}: no such file or folder")
        found = sorted(i.path for i in filesystem.get_file_info(fs.FileSelector(path, recursive=False))
                       if i.type == fs.FileType.File)
        if pattern is not None:
            found = [f for f in found if fnmatch.fnmatch(f.rsplit("/", 1)[-1], pattern)]
            if not found:
                raise ExciteError(f"{item}: no file matches this pattern")
        else:
            found = [f for f in found if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES]
        prefix = f"{scheme}://" + ("" if scheme != "file" or found[:1] and found[0].startswith("/") else "/")
        out.extend(UriPath(prefix + f) for f in found)
    return out


def load_any_image(path):
    """The decoded RGB image of a local path or a URI (ExciteError when unreadable)."""
    from ..io.images import load_image

    if not is_uri(path):
        return load_image(path)
    filesystem, inner = _filesystem(str(path))
    try:
        with filesystem.open_input_file(inner) as f:
            data = f.read()
    except Exception as exc:
        raise ExciteError(f"{path}: cannot read image ({str(exc).splitlines()[0]})") from None
    suffix = PurePosixPath(inner).suffix
    with tempfile.TemporaryDirectory(prefix="onnx-excite-") as tmp:  # load_image's checks and conversions
        local = Path(tmp) / f"image{suffix}"
        local.write_bytes(data)
        try:
            return load_image(local)
        except ExciteError as exc:
            raise ExciteError(str(exc).replace(str(local), str(path))) from None


def _pack(arr: np.ndarray) -> dict:
    return {"data": arr.tobytes(), "shape": list(arr.shape), "dtype": str(arr.dtype)}


def _unpack(data: bytes, shape, dtype) -> np.ndarray:
    return np.frombuffer(data, dtype=np.dtype(str(dtype))).reshape([int(d) for d in shape])


# ---------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------
def _decode_for_explain(row: dict, setup) -> dict:
    out = {"index": row["index"], "path": row["path"], "error": "", "pixels": b"", "pixels_shape": [0],
           "x": b"", "x_shape": [0], "x_dtype": "float32", "prepared": b""}
    try:
        img = load_any_image(row["path"])
    except ExciteError as exc:
        out["error"] = str(exc)
        return out
    arr, prepared = setup.preprocess(img)
    pixels = np.asarray(img, dtype=np.uint8)
    out.update(pixels=pixels.tobytes(), pixels_shape=list(pixels.shape), x=arr.tobytes(), x_shape=list(arr.shape),
               x_dtype=str(arr.dtype), prepared=pickle.dumps(prepared))
    return out


class _NoStore:
    """A worker stores nothing: the driver's :class:`~onnx_excite.io.records.RecordStore` writes the records."""

    def put(self, record: dict) -> None:
        pass


class ExplainActor:
    """One model per actor: :class:`explain._Run` (its companion graphs per input shape) built
    once from the shipped setup, then batches of decoded images in, one record per image out."""

    def __init__(self, shipped, threads: Optional[int] = None):
        import ray

        from .explain import _Run

        setup, opts, input_paths = ray.get(shipped[0])
        self.setup, self.opts = setup, opts
        self.run = _Run(setup.model, setup.layers, opts, setup.class_names, input_paths, setup.style, _NoStore(),
                        setup.settings, threads=threads, layout=setup.layout)

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        n = len(batch["index"])
        records, errors = [""] * n, [str(e) for e in batch["error"]]
        written = [0] * n
        meta = [""] * n
        pending: list = []

        def flush():
            if not pending:
                return
            run = self.run
            before, w0, f0 = len(run.summary.records), run.summary.written, len(run.failures)
            run.batch([item for _, item in pending])
            new = {rec["image"]: rec for rec in run.summary.records[before:]}
            per = (run.summary.written - w0) // max(1, len(new))
            reason = run.failures[-1] if len(run.failures) > f0 else "not explained"
            choice = run.summary.logits_choice
            info = json.dumps({"providers": list(run.summary.providers),
                               "logits": None if choice is None else pickle.dumps(choice).hex()})
            for i, (path, *_rest) in pending:
                rec = new.get(str(path))
                if rec is None:
                    errors[i] = reason
                else:
                    records[i], written[i], meta[i] = json.dumps(rec), per, info
            del run.summary.records[before:]
            pending.clear()

        for i in range(n):
            if errors[i]:
                continue
            raw = str(batch["path"][i])
            path = UriPath(raw) if is_uri(raw) else Path(raw)
            img = Image.fromarray(_unpack(batch["pixels"][i], batch["pixels_shape"][i], "uint8"), "RGB")
            arr = _unpack(batch["x"][i], batch["x_shape"][i], batch["x_dtype"][i])
            prepared = pickle.loads(batch["prepared"][i])
            if pending and (len(pending) == self.opts.batch_size or pending[0][1][2].shape != arr.shape):
                flush()
            pending.append((i, (path, img, arr, prepared)))
        flush()
        return {"index": np.asarray(batch["index"]), "record": np.asarray(records, dtype=object),
                "error": np.asarray(errors, dtype=object), "written": np.asarray(written),
                "meta": np.asarray(meta, dtype=object)}


def explain_on_ray(inputs: Sequence, opts, settings: RaySettings, on_error: Optional[Callable[[str, str], None]] = None,
                   warn=None, _actor_cls=ExplainActor):
    """Explain every readable image on Ray; returns (ExplainSummary, RunStats).

    The output files and the records of ``explanations.jsonl`` are those of
    :func:`explain.explain_files` with the same options (the same
    :class:`~onnx_excite.io.records.RecordStore`, written by the driver as records arrive and put
    in input order at the end); images whose record with the same settings and all its output
    files are already there are skipped."""
    from ..io.checks import output_dir
    from .explain import ExplainSummary, explain_setup, parse_outputs, warn_if_large
    from ..io.records import RecordStore

    t0 = time.perf_counter()
    settings.check()
    setup = explain_setup(opts, warn)
    files = list_inputs(inputs)
    if not files:
        raise ExciteError("no input images found")
    warn_if_large(len(files), setup, opts, warn)
    out_dir = output_dir(opts.out_dir)
    opts = dataclasses.replace(opts, out_dir=out_dir)
    keep = "record" in parse_outputs(opts.outputs)   # without it: no explanations.jsonl, nothing to resume from
    if not keep and any(not is_uri(str(f)) and Path(f).resolve().parent == out_dir.resolve() for f in files):
        raise ExciteError(f"--outputs without record into a folder of input images ({out_dir}): a later run could not "
                          f"tell the overlays from the photos; choose another -o or add record")
    store = RecordStore(out_dir, keep=keep)
    if store.skipped and warn is not None:
        warn(f"{store.path}: {len(store.skipped)} line(s) are no records and are dropped ({store.skipped[0]})")
    names = [str(f) for f in files]
    summary = ExplainSummary(input_size=setup.input_size, notes=list(setup.notes))
    done_before = {}
    for n in names:
        rec = store.done(n, setup.settings)
        if rec is not None:
            done_before[n] = rec
    todo = [i for i, n in enumerate(names) if n not in done_before]
    stats = RunStats(images=len(files), resumed=len(files) - len(todo))
    summary.skipped = stats.resumed
    new: dict = {}
    if todo:
        ray = connect(settings)
        portable = dataclasses.replace(setup, model=_portable_model(setup.model))
        input_paths = {Path(f).resolve() for f in files if not is_uri(str(f))}
        shipped = ray.put((portable, opts, input_paths))
        light = dataclasses.replace(setup, model=None)
        ds = ray.data.from_items([{"index": i, "path": names[i]} for i in todo],
                                 override_num_blocks=_num_blocks(len(todo), settings))
        ds = ds.map(_decode_for_explain, fn_kwargs={"setup": light}, num_cpus=DECODE_CPUS)
        ds = ds.map_batches(_actor_cls, fn_constructor_args=([shipped], max(1, int(settings.cpus_per_actor))),
                            **_actor_args(settings))

        def on_row(row):
            name = names[int(row["index"])]
            if row["error"]:
                stats.failed += 1
                stats.errors.append((name, str(row["error"])))
                if on_error:
                    on_error(name, str(row["error"]))
                return
            rec = json.loads(row["record"])
            new[name] = rec
            store.put(rec)   # on disk now: an interrupted run keeps what finished
            summary.written += int(row["written"])
            if row["meta"]:
                info = json.loads(row["meta"])
                summary.providers = info["providers"]
                if info["logits"]:
                    summary.logits_choice = pickle.loads(bytes.fromhex(info["logits"]))
            stats.done += 1

        _collect(ds, on_row)
    # the final file: records of other images first, then this job's inputs in input order
    if new:
        store.reorder([n for n in names if n in new or n in done_before], setup.settings)
    if (new or done_before) and keep:
        summary.written += 1
    summary.records = [new[n] if n in new else done_before[n] for n in names if n in new or n in done_before]
    summary.failed = stats.failed
    stats.seconds = time.perf_counter() - t0
    summary.images, summary.seconds = len(new), stats.seconds
    return summary, stats


def _portable_model(model):
    """The model as a ModelProto (workers on other machines cannot read the driver's path)."""
    if isinstance(model, (str, Path)):
        import onnx

        return onnx.load(str(model))
    return model


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------
def _decode_for_eval(row: dict, plan) -> dict:
    from .eval.compute import ModelError

    rec = pickle.loads(row["rec"])
    out = {"index": row["index"], "rec": row["rec"], "error": "", "x": b"", "x_shape": [0], "x_dtype": "float32"}
    if plan.needs_input(rec):
        try:
            arr = plan.spec.input_array(rec.path)
        except ModelError:
            raise
        except ExciteError as exc:
            out["error"] = str(exc)
            return out
        out.update(x=arr.tobytes(), x_shape=list(arr.shape), x_dtype=str(arr.dtype))
    return out


class EvalActor:
    """One :class:`~onnx_excite.apps.eval.compute.MapComputer` per actor, built from the shipped plan;
    each row: :func:`~onnx_excite.apps.eval.run.evaluate_image`, the outcome pickled back."""

    def __init__(self, shipped, threads: Optional[int] = None):
        import ray

        from .eval.compute import MapComputer

        self.plan = ray.get(shipped[0])
        self.computer = MapComputer(self.plan.spec, threads=threads) if self.plan.spec is not None else None

    def __call__(self, batch: dict) -> dict:
        from .eval.run import ImageOutcome, evaluate_image

        outcomes = []
        for i in range(len(batch["index"])):
            rec = pickle.loads(batch["rec"][i])
            if batch["error"][i]:
                sel = self.plan.scorer.select(rec)
                outcome = ImageOutcome(rec.id, unmapped=sel.unmapped, skipped=str(batch["error"][i]), failed=True)
            else:
                x = batch["x"][i]
                arr = _unpack(x, batch["x_shape"][i], batch["x_dtype"][i]) if len(x) else None
                outcome = evaluate_image(rec, self.plan, self.computer, arr)
            outcomes.append(pickle.dumps(outcome))
        return {"index": np.asarray(batch["index"]), "outcome": np.asarray(outcomes, dtype=object)}


def evaluate_on_ray(records: Sequence, plan, settings: RaySettings, on_progress=None, _actor_cls=EvalActor) -> list:
    """The :class:`~onnx_excite.apps.eval.run.ImageOutcome` of every record (in order), computed on Ray."""
    settings.check()
    if not records:
        return []
    ray = connect(settings)
    if plan.spec is not None:
        shipped_plan = dataclasses.replace(plan, spec=plan.spec.portable())
        light = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, source=None))
    else:
        shipped_plan = light = plan
    shipped = ray.put(shipped_plan)
    ds = ray.data.from_items([{"index": i, "rec": pickle.dumps(r)} for i, r in enumerate(records)],
                             override_num_blocks=_num_blocks(len(records), settings))
    ds = ds.map(_decode_for_eval, fn_kwargs={"plan": light}, num_cpus=DECODE_CPUS)
    ds = ds.map_batches(_actor_cls, fn_constructor_args=([shipped], max(1, int(settings.cpus_per_actor))),
                        **_actor_args(settings))
    outcomes: list = [None] * len(records)
    count = [0]

    def on_row(row):
        outcomes[int(row["index"])] = pickle.loads(row["outcome"])
        count[0] += 1
        if on_progress:
            on_progress(count[0], len(records))

    _collect(ds, on_row)
    missing = [records[i].id for i, o in enumerate(outcomes) if o is None]
    if missing:
        raise ExciteError(f"the Ray job returned no result for {len(missing)} image(s), e.g. {missing[0]}")
    return outcomes
