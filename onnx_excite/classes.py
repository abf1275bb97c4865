"""Class names: look a class up by index, by its description or by any one of its synonyms.

ImageNet descriptions list synonyms separated by commas (``"malamute, malemute, Alaskan
malamute"``): each of them names the class, compared case-insensitively with runs of
white space collapsed. A name that several classes share (``"crane"``: the bird and the
machine) is refused with the candidates; an unknown name gets the closest known names and
the classes it is a broader word for: a synonym's head noun ("retriever" -> the retriever
breeds) and, for ImageNet's classes, the bundled hypernym groups ("horse" -> sorrel, "dog" ->
the 118 breeds), the same words the grounding vocabulary maps.
"""
from __future__ import annotations

import difflib
import functools
import json
import re
from importlib import resources
from typing import Sequence

from .errors import ExciteError


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().lower()


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words_of(text: str) -> list[str]:
    """Lower-case word tokens: letters/digits, an apostrophe suffix kept ("man's"),
    hyphens and other punctuation split."""
    return _WORD.findall(str(text).lower())


@functools.lru_cache(maxsize=1)
def imagenet_hypernym_groups() -> dict[str, tuple[int, ...]]:
    """The bundled hypernym groups over the ILSVRC-2012 class indices
    (``data/grounding/imagenet_hypernyms.json``): a word -> the classes it is a broader name for."""
    text = resources.files("onnx_excite").joinpath("data", "grounding", "imagenet_hypernyms.json").read_text("utf-8")
    raw = json.loads(text)["groups"]
    groups: dict[str, tuple[int, ...]] = {}
    for word, spec in raw.items():
        if "same_as" in spec:
            continue
        indices = list(spec.get("indices", []))
        for first, last in spec.get("ranges", []):
            indices.extend(range(first, last + 1))
        groups[word] = tuple(indices)
    for word, spec in raw.items():
        if "same_as" in spec:
            groups[word] = groups[spec["same_as"]]
    return groups


def _is_imagenet(class_names: Sequence[str]) -> bool:
    from onnx_excite.models.profiles import imagenet_class_names

    return len(class_names) == 1000 and list(class_names) == list(imagenet_class_names())


def related_classes(word: str, class_names: Sequence[str] | None) -> list[int]:
    """The classes ``word`` is a broader name for: for ImageNet's classes a bundled hypernym
    group when there is one ("horse" -> [339] sorrel), otherwise every class with a multi-word
    synonym whose last word is ``word`` ("retriever" -> the five retrievers)."""
    if not class_names:
        return []
    want = " ".join(words_of(word))
    if not want:
        return []
    if _is_imagenet(class_names):
        group = imagenet_hypernym_groups().get(want)
        if group is not None:
            return sorted(group)
    return [i for i, d in enumerate(class_names)
            if any(len(t) > 1 and t[-1] == want for t in (words_of(s) for s in synonyms(d)))]


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
    related = related_classes(text, class_names)
    if related:
        shown = ", ".join(f"{i} ({class_names[i]})" for i in related[:8])
        more = f" and {len(related) - 8} more (`onnx-excite classes --grep {text}`)" if len(related) > 8 else ""
        raise ExciteError(f"unknown class name {text!r}: no class is called that; it is a broader name for "
                          f"{shown}{more}; give one of them")
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
    (case-insensitive) or that ``grep`` is a broader name for (:func:`related_classes`:
    ``"horse"`` finds sorrel too)."""
    if not grep:
        return list(enumerate(class_names))
    want = _norm(grep)
    related = set(related_classes(grep, class_names))
    return [(i, d) for i, d in enumerate(class_names) if want in _norm(d) or i in related]
