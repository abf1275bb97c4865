"""The per-image map cache of an evaluation: ``<folder>/<protocol>/<image key>.npz``.

The key (:func:`cache_key`) is the image id made file-safe plus a hash of the image's full
name in its dataset, so two images never share an entry.

One file per image holds, for every class evaluated so far, the model output indices the
class maps to (``idx|<class>``) and one map per method and layer (``<method>|<layer>|<class>``),
plus ``meta``: the model's SHA-256, rule and preprocessing. A black-box map (RISE) is stored
as ``rise|<settings tag>|<class>`` (:func:`rise_key`: the masks, cells, p and seed). A file whose ``meta`` differs, or
that cannot be read, counts as absent; a class whose indices changed is recomputed. Re-runs
with another tolerance, more classes or an interrupted run reuse what is there.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "image"


def cache_key(rec) -> str:
    """The file stem of an image's entry: its id made file-safe (at most 64 characters) and 16
    hex digits of the SHA-256 of its full name in the dataset (``rec.key``, else the id), so ids
    that read alike (``x y``, ``x_y``) and files of one name in two folders (COCO's
    ``train/x.jpg``, ``val/x.jpg``) have entries of their own."""
    digest = hashlib.sha256((rec.key or rec.id).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe_id(rec.id)[:64]}-{digest}"


class MapCache:
    def __init__(self, folder, protocol: str, meta: str):
        self.folder, self.protocol, self.meta = Path(folder), protocol, meta

    def path(self, rec) -> Path:
        """The entry of the :class:`ImageRecord` ``rec``."""
        return self.folder / self.protocol / f"{cache_key(rec)}.npz"

    def load(self, rec) -> dict:
        """The stored arrays of this image (without ``meta``), or {} when absent or stale."""
        path = self.path(rec)
        if not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["meta"]) != self.meta:
                    return {}
                return {k: z[k] for k in z.files if k != "meta"}
        except Exception:  # unreadable cache: recompute
            return {}

    def save(self, rec, stored: dict) -> None:
        """Write atomically (a temporary file renamed), so an interrupted run leaves no half file."""
        path = self.path(rec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, meta=np.array(self.meta), **stored)
        tmp.replace(path)


def missing_classes(stored: dict, classes: Sequence[str], indices: dict, methods: Sequence[str],
                    layers: Sequence[str]) -> list[str]:
    """The classes of ``classes`` whose maps are not all in ``stored`` for these indices."""
    def fresh(c):
        idx: Optional[np.ndarray] = stored.get(f"idx|{c}")
        if idx is None or tuple(int(v) for v in idx) != tuple(indices[c]):
            return False
        return all(f"{m}|{l}|{c}" in stored for m in methods for l in layers)

    return [c for c in classes if not fresh(c)]


def rise_key(settings, cls: str) -> str:
    """The entry of one class's RISE map for :class:`~onnx_excite.apps.rise.RiseSettings` ``settings``."""
    return f"rise|{settings.tag}|{cls}"


def missing_rise(stored: dict, classes: Sequence[str], indices: dict, settings) -> list[str]:
    """The classes of ``classes`` without a RISE map of these settings and indices in ``stored``."""
    def fresh(c):
        idx: Optional[np.ndarray] = stored.get(f"idx|{c}")
        return idx is not None and tuple(int(v) for v in idx) == tuple(indices[c]) and rise_key(settings, c) in stored

    return [c for c in classes if not fresh(c)]
