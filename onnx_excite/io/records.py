"""``explanations.jsonl`` as a keyed store: one record per (image, settings), written as each
image is done, never duplicated.

A record is a JSON object with at least ``image`` (the input path), ``settings`` (what
was asked: model, layers, methods, targets, sizes, rendering) and ``outputs`` (a list of
dicts whose string values ending in a file suffix are paths of written files).

* :meth:`RecordStore.done` returns the stored record of an image whose settings match and
  whose output files all exist: a re-run skips that image (idempotent runs, resumable jobs);
* :meth:`RecordStore.put` appends a new record (flushed at once, so a run that stops half
  way keeps the images it finished) or, when the key is already stored, rewrites the file
  with the record replaced (through a temporary file and ``os.replace``: atomic).

Several workers must not share one store file; give each its own output folder (or merge
the files with :func:`merge` afterwards).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..errors import ExciteError

try:
    import fcntl
except ImportError:   # Windows
    fcntl = None

FILE_NAME = "explanations.jsonl"
_PATH_SUFFIXES = (".npy", ".png", ".jpg", ".webp", ".json")


def record_key(image, settings: dict) -> str:
    """The identity of a record: the resolved image path and the canonical settings."""
    return json.dumps([str(Path(image).resolve()), settings], sort_keys=True)


def output_paths(record: dict) -> list[Path]:
    """Every file a record says was written."""
    paths = []
    for out in record.get("outputs", []):
        for value in out.values():
            if isinstance(value, str) and value.endswith(_PATH_SUFFIXES):
                paths.append(Path(value))
    return paths


def _stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def is_complete(record: dict) -> bool:
    """The record lists outputs, every file among them exists, and none was written again since
    (a run with other settings into the same folder rewrites files of the same name: their
    size and modification time, stamped when the record was stored, then differ). Outputs
    that name no file (``explain --outputs record``: the classes and their probabilities
    only) are complete as they are."""
    paths = output_paths(record)
    if not record.get("outputs") or not all(p.is_file() for p in paths):
        return False
    stamps = record.get("stamps")
    if not isinstance(stamps, dict):
        return True   # a record written before stamps were kept
    return all(stamps.get(str(p)) == _stamp(p) for p in paths)


class FolderLock:
    """One writer per output folder: ``with FolderLock(folder):`` holds an exclusive lock on
    ``folder/.onnx-excite.lock`` (which names the holder's process id); a second run into the
    folder gets one error line while the first lives. The lock is the kernel's (``flock``):
    it goes with its process, so a run that was killed leaves no lock behind, and two runs
    that start at the same instant cannot both take it. Where ``flock`` is missing
    (Windows) the file is created exclusively and a file naming a dead process is taken over."""

    def __init__(self, folder):
        self.path = Path(folder) / ".onnx-excite.lock"
        self._fd: int | None = None

    def _refuse(self) -> ExciteError:
        return ExciteError(f"{self.path.parent}: another onnx-excite run (process {self._holder()}) is "
                           "writing to this folder; wait for it or choose another -o")

    def __enter__(self):
        if fcntl is None:
            return self._enter_exclusive()
        for _ in range(8):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse() from None
            try:   # the file may have been unlinked by the holder that just let go: lock the one on disk
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._fd = fd
            return self
        raise ExciteError(f"{self.path}: cannot take the folder's lock")

    def _enter_exclusive(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._holder_alive():
                    raise self._refuse() from None
                self.path.unlink(missing_ok=True)   # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise ExciteError(f"{self.path}: cannot take the folder's lock")

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _holder_alive(self) -> bool:
        pid = self._holder()
        if pid is None or pid == os.getpid():
            return pid is not None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __exit__(self, *exc) -> None:
        if self._fd is not None:   # unlink while still holding it, then let go
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        elif self._holder() == os.getpid():
            self.path.unlink(missing_ok=True)


def record_problem(rec) -> Optional[str]:
    """Why a parsed line is not a usable record (None: it is one)."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not isinstance(rec.get("image"), str) or not rec["image"]:
        return "'image' is not a path"
    if rec.get("settings") is not None and not isinstance(rec["settings"], dict):
        return "'settings' is not an object"
    outputs = rec.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        return "'outputs' is not a list of objects"
    return None


def read_records(path, skipped: Optional[list] = None) -> list[dict]:
    """The records of a JSONL file, later lines replacing earlier ones of the same key;
    lines that are not records (cut off by a crash, edited by hand) are dropped, and said in
    ``skipped`` (``"line N: why"``) when a list is given."""
    path = Path(path)
    if not path.is_file():
        return []
    by_key: dict = {}
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                problem = "not valid JSON"
            else:
                problem = record_problem(rec)
            if problem is not None:
                if skipped is not None:
                    skipped.append(f"line {number}: {problem}")
                continue
            key = record_key(rec["image"], rec.get("settings"))
            by_key.pop(key, None)
            by_key[key] = rec
    return list(by_key.values())


def _dump(record: dict) -> str:
    return json.dumps(record, allow_nan=False)   # NaN would make the line invalid JSON


class RecordStore:
    """The records of one output folder's ``explanations.jsonl``."""

    def __init__(self, folder, file_name: str = FILE_NAME, keep: bool = True):
        self.path = Path(folder) / file_name
        #: False: records are held in memory only (``explain --outputs`` without ``record``);
        #: the file, if any, is read but never written
        self.keep = keep
        #: the lines of the file that were no records (dropped when the file is rewritten)
        self.skipped: list[str] = []
        self.records = {record_key(r["image"], r.get("settings")): r for r in read_records(self.path, self.skipped)}
        if keep and self.path.is_file() and self._line_count() != len(self.records):
            self._rewrite()   # duplicates or broken lines from an older version or a crash

    def _line_count(self) -> int:
        with self.path.open(encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())

    def done(self, image, settings: dict) -> Optional[dict]:
        """The stored record for ``image`` with these settings if all its outputs exist."""
        rec = self.records.get(record_key(image, settings))
        return rec if rec is not None and is_complete(rec) else None

    def put(self, record: dict) -> None:
        """Store ``record`` (keyed by its ``image`` and ``settings``) on disk now, with the
        size and modification time of each output file it lists (see :func:`is_complete`)."""
        record["stamps"] = {str(p): _stamp(p) for p in output_paths(record) if p.is_file()}
        line = _dump(record)
        key = record_key(record["image"], record.get("settings"))
        replacing = key in self.records
        self.records[key] = record
        if not self.keep:
            return
        if replacing:
            self._rewrite()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def reorder(self, images: Sequence, settings: dict) -> None:
        """Rewrite the file with the records of ``images`` (these settings) last, in that order."""
        keys = [record_key(image, settings) for image in images]
        wanted = set(keys)
        ordered = {k: r for k, r in self.records.items() if k not in wanted}
        ordered.update((k, self.records[k]) for k in keys if k in self.records)
        self.records = ordered
        if self.keep:
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for rec in self.records.values():
                fh.write(_dump(rec) + "\n")
        os.replace(tmp, self.path)


def merge(sources: Iterable, target) -> int:
    """Merge JSONL record files into ``target`` (later sources win per key); the record count."""
    store = RecordStore(Path(target).parent, Path(target).name)
    for src in sources:
        for rec in read_records(src):
            store.put(rec)
    return len(store.records)
