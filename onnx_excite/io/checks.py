"""Validation of user-given values and output paths: one clear ExciteError line each.

Every check runs before any work starts, so that a bad option never costs a long run
nor leaves half-written files behind.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ExciteError


def at_least(value, minimum: int, option: str) -> int:
    """``value`` as an int, or an error naming the option when it is below ``minimum``."""
    if value is None or int(value) != value or int(value) < minimum:
        raise ExciteError(f"{option} must be an integer of at least {minimum}, not {value}")
    return int(value)


def float_list(text, option: str, length: Optional[int] = None, positive: bool = False,
               default: Optional[Sequence[float]] = None) -> Optional[tuple]:
    """Comma-separated finite numbers (``"0.5,0.5,0.5"``); ``length`` values when given
    (one per input channel), all > 0 when ``positive`` (a std of 0 divides by zero)."""
    if text is None:
        return None if default is None else tuple(float(v) for v in default)
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise ExciteError(f"{option}: cannot read {text!r} as comma-separated numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ExciteError(f"{option}: {text!r} holds a value that is not a finite number")
    if length is not None and len(values) != length:
        raise ExciteError(f"{option}: {len(values)} value(s) given, the image has {length} channels: give {length}")
    if positive and any(v <= 0 for v in values):
        raise ExciteError(f"{option}: every value must be greater than 0 (got {text})")
    return values


def _probe_writable(folder: Path, option: str) -> None:
    """Create and remove a file in ``folder``: permissions, read-only file systems and
    quotas all show up here, before any result is computed."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnx-excite-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ExciteError(f"{option} {folder}: cannot write there ({exc.strerror or type(exc).__name__})") from None


def output_dir(path, option: str = "-o") -> Path:
    """An existing or new folder we can write to; never an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ExciteError(f"{option} {path}: is an existing file, not a folder; choose a folder name")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a parent is a file
        raise ExciteError(f"{option} {path}: a part of this path is an existing file") from None
    except OSError as exc:
        raise ExciteError(f"{option} {path}: cannot create the folder ({exc.strerror or type(exc).__name__})") from None
    _probe_writable(path, option)
    return path


def creatable_dir(path, option: str = "-o") -> Path:
    """Check, creating nothing, that ``path`` is a folder or can be made one: no part of it an
    existing file, its nearest existing folder writable. For commands that must validate
    everything before they create anything (the folder itself is made later, with
    :func:`output_dir`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ExciteError(f"{option} {path}: is an existing file, not a folder; choose a folder name")
    probe = path.absolute()
    while not probe.exists():
        if probe.is_symlink():
            raise ExciteError(f"{option} {path}: {probe} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise ExciteError(f"{option} {path}: a part of this path is an existing file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExciteError(f"{option} {path}: cannot create the folder ({probe} is not writable)")
    return path


def is_protected(path, protect: Sequence) -> bool:
    """Whether writing ``path`` would write one of ``protect``: the same path after resolving
    links, or the same file by inode (a hard link)."""
    path = Path(path)
    resolved = path.resolve()
    for p in protect:
        p = Path(p)
        if resolved == p.resolve():
            return True
        try:
            if path.exists() and p.exists() and os.path.samefile(path, p):
                return True
        except OSError:
            continue
    return False


def output_file(path, option: str = "-o", protect: Sequence = (), create: bool = True) -> Path:
    """A file path we can write: not a folder, not one of ``protect`` (the input model and its
    external-data files; hard links of them too), in a folder that exists or can be created
    (``create``) and is writable."""
    path = Path(path)
    if path.is_dir():
        raise ExciteError(f"{option} {path}: is a folder; give a file name (e.g. {path / 'model.excite.onnx'})")
    if is_protected(path, protect):
        raise ExciteError(f"{option} {path}: refusing to overwrite the input model or its data")
    if create:
        output_dir(path.parent if str(path.parent) else Path("."), option)
    return path
