"""Class names: look a class up by index, by its description or by any one of its synonyms.

ImageNet descriptions list synonyms separated by commas (``"malamute, malemute, Alaskan
malamute"``): each of them names the class, compared case-insensitively with runs of
white space collapsed. A name that several classes share (``"crane"``: the bird and the
machine) is refused with the candidates; an unknown name gets the closest known names.
"""
from __future__ import annotations

import difflib
import re
from typing import Sequence

from .errors import ExciteError


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().lower()


def synonyms(description: str) -> list[str]:
    """The comma-separated names of one class description, stripped."""
    return [s.strip() for s in str(description).split(",") if s.strip()]


def class_index(name, class_names: Sequence[str] | None, num_classes: int | None = None) -> int:
    """The index of class ``name``: an integer (``"249"``), a whole description or one of its
    synonyms, case-insensitively. ExciteError when it is out of range, unknown (with the closest
    names), or shared by several classes (with their indices)."""
    text = str(name).strip()
    k = num_classes if num_classes is not None else (len(class_names) if class_names else None)
    if text.lstrip("-").isdigit():
        idx = int(text)
        if k is not None and not 0 <= idx < k:
            raise ExciteError(f"target class {idx} out of range 0..{k - 1}")
        return idx
    if not class_names:
        raise ExciteError(f"unknown class name {text!r} (the model has no class names; give an index)")
    want = _norm(text)
    hits = [i for i, d in enumerate(class_names) if _norm(d) == want or want in (_norm(s) for s in synonyms(d))]
    if len(hits) == 1:
        return hits[0]
    if hits:
        listed = ", ".join(f"{i} ({class_names[i]})" for i in hits)
        raise ExciteError(f"class name {text!r} is ambiguous: {listed}; give the index")
    known = {}
    for i, d in enumerate(class_names):
        for s in synonyms(d):
            known.setdefault(_norm(s), (s, i))
    close = difflib.get_close_matches(want, list(known), n=4, cutoff=0.7)
    hint = (f"; did you mean {', '.join(f'{known[c][0]!r} ({known[c][1]})' for c in close)}?" if close
            else "; list them with `onnx-excite classes`")
    raise ExciteError(f"unknown class name {text!r}{hint}")


def find_classes(class_names: Sequence[str], grep: str | None = None) -> list[tuple[int, str]]:
    """(index, description) of every class, or of those whose description contains ``grep``
    (case-insensitive)."""
    want = _norm(grep) if grep else None
    return [(i, d) for i, d in enumerate(class_names) if want is None or want in _norm(d)]
