"""Where names read from data files may lead: inside their root, and outputs inside ``-o``.

The rule, for every dataset, annotation and boxes file the tool reads:

* a name taken from a data file (an image id, a VOC ``<filename>``, a COCO ``file_name``,
  a key of a boxes folder) is a path relative to its root (the dataset's folder, its
  images folder, the boxes folder) and must stay inside it: an absolute path, a NUL byte,
  a ``..`` component or a symlinked folder leading out of the root is refused with one
  :class:`ExciteError` line naming the file, the record and the field. The named file
  itself may be a symbolic link (photo folders often are, and ``eval
  entities-from-detection`` writes its ``Images/`` as links);
* every file the tool writes resolves, symlinks included, inside the output folder the
  user named (:func:`output_inside`);
* input files are never written, and a file the tool did not create is never removed.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePath

from ..errors import ExciteError


def inside(root, relative, what: str) -> Path:
    """``root / relative`` when ``relative`` names a path inside ``root`` (see the module
    docstring), else ExciteError ``"<what> <relative>: <why>"``."""
    if not isinstance(relative, (str, os.PathLike)):
        raise ExciteError(f"{what} must be a string, not {type(relative).__name__}")
    text = os.fspath(relative)
    if "\x00" in text:
        raise ExciteError(f"{what} {text!r} holds a NUL byte")
    if not text.strip():
        raise ExciteError(f"{what} is empty")
    rel = PurePath(text)
    if rel.is_absolute():
        raise ExciteError(f"{what} {text!r} is an absolute path; names in a data file are relative to {root}")
    if ".." in rel.parts:
        raise ExciteError(f"{what} {text!r} holds a '..' component; names in a data file stay inside {root}")
    path = Path(root) / rel
    if not _within(path.parent.resolve(), Path(root).resolve()):
        raise ExciteError(f"{what} {text!r} leads outside {root} through a symbolic link")
    return path


def output_inside(root, relative, what: str) -> Path:
    """``root / relative`` for a file to write: :func:`inside`, and the file itself (when it is
    already there, as a link) must also resolve inside ``root``."""
    path = inside(root, relative, what)
    if not _within(path.resolve(), Path(root).resolve()):
        raise ExciteError(f"{what} {path} is a symbolic link leading outside {root}; remove it or choose another folder")
    return path


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
