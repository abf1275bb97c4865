"""Dataset class names -> model output indices (the top signal is multi-hot over the set).

A mapping file is JSON::

    {
      "description": "...",
      "mapping": {
        "bottle": {"indices": [440, 720], "names": ["beer bottle", "pill bottle"]},
        "sofa": [831],
        "pillow": 721,
        "chair": ["folding chair", 765]
      },
      "unmapped": {"person": "no ImageNet-1k class", "door": "..."}
    }

An entry is an index, a model class name, a list of those, or an object with ``indices``
(and optionally ``names``: the first comma-separated item of each index's model class name,
checked against the model's class list when it has one). ``unmapped`` is a list or a
name -> reason object. A flat object (no ``mapping`` key) is read as the mapping itself.

A dataset class with no entry maps directly when its name is an integer (that output) or
equals a model class name (case-insensitive; the whole name or its first comma-separated
item; every such class when several match). Everything else is unmapped: those classes are
skipped by the evaluation and reported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ...errors import ExciteError


def bundled_mappings() -> list[str]:
    """Names of the mapping files shipped in onnx_excite/data/mappings/ (without .json)."""
    folder = resources.files("onnx_excite").joinpath("data", "mappings")
    try:
        return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def read_mapping_file(mapping) -> tuple:
    """``(data dict, source label)`` for a path, a bundled mapping name, or a dict."""
    if isinstance(mapping, dict):
        return mapping, "<dict>"
    path = Path(mapping)
    if not path.is_file():
        name = str(mapping)[:-5] if str(mapping).endswith(".json") else str(mapping)
        if name in bundled_mappings() and "/" not in name:
            res = resources.files("onnx_excite").joinpath("data", "mappings", f"{name}.json")
            text, source = res.read_text(encoding="utf-8"), f"{name}.json (bundled)"
        else:
            known = ", ".join(bundled_mappings()) or "none"
            raise ExciteError(f"{mapping}: no such mapping file (bundled mappings: {known})")
    else:
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExciteError(f"{source}: malformed JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ExciteError(f"{source}: a mapping file holds a JSON object")
    return data, source


#: top-level keys of a mapping file that are not class names
RESERVED_KEYS = {"description", "model_classes", "unmapped", "notes", "source"}


def _short(name: str) -> str:
    return name.split(",")[0].strip().lower()


@dataclass
class ClassMapping:
    """Resolved mapping for the classes of one dataset and one model."""

    indices: dict = field(default_factory=dict)      # dataset class -> tuple of model indices
    unmapped: dict = field(default_factory=dict)     # dataset class -> reason
    how: dict = field(default_factory=dict)          # dataset class -> "file" | "index" | "name"
    source: str = "<none>"
    num_classes: Optional[int] = None

    def __contains__(self, name: str) -> bool:
        return name in self.indices

    def signal(self, names: Sequence[str], num_classes: int) -> np.ndarray:
        """``len(names) x K`` float32: row i is multi-hot over the indices of ``names[i]``."""
        sig = np.zeros((len(names), num_classes), np.float32)
        for i, name in enumerate(names):
            sig[i, list(self.indices[name])] = 1.0
        return sig

    def to_json(self) -> dict:
        return {"source": self.source, "indices": {k: list(v) for k, v in sorted(self.indices.items())},
                "how": dict(sorted(self.how.items())), "unmapped": dict(sorted(self.unmapped.items()))}


def _lookup_name(text: str, class_names: Optional[Sequence[str]]) -> list[int]:
    if not class_names:
        return []
    t = text.strip().lower()
    hits = [i for i, n in enumerate(class_names) if _short(n) == t]
    return hits or [i for i, n in enumerate(class_names) if n.strip().lower() == t]


def resolve_mapping(mapping, dataset_classes: Sequence[str], num_classes: Optional[int] = None,
                    class_names: Optional[Sequence[str]] = None) -> ClassMapping:
    """Resolve every dataset class (see the module docstring). ``mapping`` is a path, a bundled
    name (``"voc_sample_to_imagenet"``), a dict or None (direct matches only). Entries that
    cannot fit the model (index out of range, unknown class name, ``names`` not matching the
    model's class list) raise ExciteError: the file was written for another model."""
    data, source = ({}, "<none>") if mapping is None else read_mapping_file(mapping)
    if "mapping" in data:
        entries = data["mapping"]
    else:  # a flat file: every key but the documented top-level ones
        entries = {k: v for k, v in data.items() if k not in RESERVED_KEYS}
    if not isinstance(entries, dict):
        raise ExciteError(f"{source}: 'mapping' must be an object of class name -> indices")
    entries = {k: v for k, v in entries.items() if not str(k).startswith("_")}
    unmapped_listed = data.get("unmapped", {})
    if isinstance(unmapped_listed, list):
        unmapped_listed = {str(n): "listed as unmapped" for n in unmapped_listed}
    if not isinstance(unmapped_listed, dict):
        raise ExciteError(f"{source}: 'unmapped' must be a list of names or an object name -> reason")
    by_lower = {str(k).strip().lower(): v for k, v in entries.items()}
    unmapped_lower = {str(k).strip().lower(): str(v) for k, v in unmapped_listed.items()}

    out = ClassMapping(source=source, num_classes=num_classes)

    def check(idx: int, cls: str) -> int:
        if num_classes is not None and not 0 <= idx < num_classes:
            raise ExciteError(f"{source}: {cls!r} maps to output {idx}, out of range for a model with "
                              f"{num_classes} outputs (a mapping for another model?)")
        return idx

    for cls in sorted(set(dataset_classes)):
        key = cls.strip().lower()
        if key in by_lower:
            entry = by_lower[key]
            names = None
            if isinstance(entry, dict):
                names = entry.get("names")
                entry = entry.get("indices", [])
            items = entry if isinstance(entry, list) else [entry]
            idx: list[int] = []
            for item in items:
                if isinstance(item, bool) or not isinstance(item, (int, str)):
                    raise ExciteError(f"{source}: {cls!r}: cannot read {item!r} as an output index or class name")
                if isinstance(item, int) or item.strip().lstrip("-").isdigit():
                    idx.append(check(int(item), cls))
                else:
                    found = _lookup_name(item, class_names)
                    if not found:
                        raise ExciteError(f"{source}: {cls!r}: no model class named {item!r}"
                                          + ("" if class_names else " (the model has no class names; give indices)"))
                    idx.extend(check(i, cls) for i in found)
            if names is not None and class_names:
                if len(names) != len(idx):
                    raise ExciteError(f"{source}: {cls!r}: {len(idx)} indices but {len(names)} names")
                for i, n in zip(idx, names):
                    if _short(class_names[i]) != str(n).strip().lower():
                        raise ExciteError(f"{source}: {cls!r}: output {i} is {class_names[i]!r}, not {n!r} "
                                          "(a mapping for another class list?)")
            if not idx:
                out.unmapped[cls] = f"empty entry in {source}"
                continue
            out.indices[cls] = tuple(dict.fromkeys(idx))
            out.how[cls] = "file"
        elif key in unmapped_lower:
            out.unmapped[cls] = unmapped_lower[key]
        elif key.lstrip("-").isdigit() and (num_classes is None or 0 <= int(key) < num_classes):
            out.indices[cls] = (int(key),)
            out.how[cls] = "index"
        elif _lookup_name(key, class_names):
            out.indices[cls] = tuple(check(i, cls) for i in _lookup_name(key, class_names))
            out.how[cls] = "name"
        else:
            out.unmapped[cls] = "no mapping entry and no model class of that name"
    return out
