"""The per-image map cache of an evaluation: ``<folder>/<protocol>/<image id>.npz``.

One file per image holds, for every class evaluated so far, the model output indices the
class maps to (``idx|<class>``) and one map per method and layer (``<method>|<layer>|<class>``),
plus ``meta``: the model's SHA-256, rule and preprocessing. A file whose ``meta`` differs, or
that cannot be read, counts as absent; a class whose indices changed is recomputed. Re-runs
with another tolerance, more classes or an interrupted run reuse what is there.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "image"


class MapCache:
    def __init__(self, folder, protocol: str, meta: str):
        self.folder, self.protocol, self.meta = Path(folder), protocol, meta

    def path(self, image_id: str) -> Path:
        return self.folder / self.protocol / f"{safe_id(image_id)}.npz"

    def load(self, image_id: str) -> dict:
        """The stored arrays of this image (without ``meta``), or {} when absent or stale."""
        path = self.path(image_id)
        if not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["meta"]) != self.meta:
                    return {}
                return {k: z[k] for k in z.files if k != "meta"}
        except Exception:  # unreadable cache: recompute
            return {}

    def save(self, image_id: str, stored: dict) -> None:
        """Write atomically (a temporary file renamed), so an interrupted run leaves no half file."""
        path = self.path(image_id)
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
