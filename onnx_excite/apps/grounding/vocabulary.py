"""Vocabulary: a word (or a multi-word name) -> the model's output indices it names.

Built from class names (:meth:`Vocabulary.from_class_names`) or read from a file
(:func:`load_vocabulary`: JSON or TSV). For the default ImageNet model
(:func:`imagenet_vocabulary`) the class names are used with these rules:

1. every comma-separated synonym of a class, lower-cased, names that class as a whole
   ("golden retriever", "tabby cat", "tabby");
2. the last word of a multi-word synonym (its head noun in English compounds) also names
   the class ("retriever" -> golden / Labrador / flat-coated ... retriever, "eagle" ->
   bald eagle); hyphens split words ("T-shirt" -> "shirt" is a head: jersey, T-shirt);
3. a small bundled hypernym list (``data/grounding/imagenet_hypernyms.json``, written by
   hand from the WordNet tree the classes come from) overrides rules 1-2 for a few common
   words: "dog" -> all 118 dog breeds (151-268), "cat" -> the five domestic cats
   (281-285), "car" -> the 11 motor-car classes, "horse" -> sorrel, "bird", "truck",
   "bus", "bicycle", "boat", "ship", "bear". Without it "dog" would name only breeds
   whose name ends in "dog" plus "hot dog".

Words with no ImageNet counterpart ("man", "shirt", colours) are simply absent: the
phrase parser reports them as out of vocabulary.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ...classes import imagenet_hypernym_groups, words_of
from ...errors import ExciteError


class VocabularyError(ExciteError):
    """A vocabulary file that cannot be read, or an entry naming no valid output."""



@dataclass
class Vocabulary:
    """``entries``: a key (one word, or several separated by single spaces) -> sorted output indices."""

    entries: dict[str, tuple[int, ...]] = field(default_factory=dict)
    num_classes: int | None = None
    source: str = ""

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> tuple[int, ...]:
        return self.entries[key]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def max_words(self) -> int:
        """The longest key, in words (the phrase parser matches up to this many)."""
        return max((k.count(" ") + 1 for k in self.entries), default=1)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Iterable[int]], num_classes: int | None = None,
                     source: str = "") -> "Vocabulary":
        entries: dict[str, tuple[int, ...]] = {}
        for raw, indices in mapping.items():
            key = " ".join(words_of(str(raw)))
            if not key:
                raise VocabularyError(f"{source or 'vocabulary'}: entry {raw!r} has no word in it")
            try:
                values = sorted({int(i) for i in indices})
            except (TypeError, ValueError):
                raise VocabularyError(f"{source or 'vocabulary'}: entry {raw!r}: output indices must be integers") from None
            if not values:
                raise VocabularyError(f"{source or 'vocabulary'}: entry {raw!r} names no output")
            bad = [i for i in values if i < 0 or (num_classes is not None and i >= num_classes)]
            if bad:
                top = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
                raise VocabularyError(f"{source or 'vocabulary'}: entry {raw!r}: index {bad[0]} out of range {top}")
            entries[key] = tuple(sorted(set(entries.get(key, ())) | set(values)))
        return cls(entries, num_classes, source)

    @classmethod
    def from_class_names(cls, names: Sequence[str], groups: Mapping[str, Iterable[int]] | None = None,
                         source: str = "class names") -> "Vocabulary":
        """Rules 1-3 of the module docstring over ``names`` (one string per output,
        comma-separated synonyms); ``groups`` replace whatever rules 1-2 gave a word."""
        mapping: dict[str, set[int]] = {}
        for index, name in enumerate(names):
            for synonym in str(name).split(","):
                tokens = words_of(synonym)
                if not tokens:
                    continue
                mapping.setdefault(" ".join(tokens), set()).add(index)
                if len(tokens) > 1:
                    mapping.setdefault(tokens[-1], set()).add(index)
        for word, indices in (groups or {}).items():
            mapping[" ".join(words_of(word))] = set(indices)
        return cls.from_mapping(mapping, num_classes=len(names), source=source)

    def to_json(self) -> dict:
        return {k: list(v) for k, v in sorted(self.entries.items())}


def imagenet_vocabulary() -> Vocabulary:
    """The default model's vocabulary: ImageNet class names + the bundled hypernym groups."""
    from onnx_excite.models.profiles import imagenet_class_names

    return Vocabulary.from_class_names(imagenet_class_names(), imagenet_hypernym_groups(), source="ImageNet class names")


def load_vocabulary(path, num_classes: int | None = None) -> Vocabulary:
    """A vocabulary file:

    * JSON object ``{"word": [indices...], "two words": [...]}``;
    * JSON list of class names, one per output (the rules of :meth:`Vocabulary.from_class_names`
      without hypernym groups);
    * TSV (any other suffix): ``word<TAB>index[,index...]`` per line (more tab-separated
      index columns are allowed); empty lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise VocabularyError(f"{path}: no such vocabulary file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"{path}: cannot read vocabulary ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VocabularyError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if isinstance(data, list) and all(isinstance(n, str) for n in data):
            vocab = Vocabulary.from_class_names(data, source=str(path))
            if num_classes is not None and len(data) != num_classes:
                raise VocabularyError(f"{path}: {len(data)} class names for a model with {num_classes} outputs")
            return vocab
        if isinstance(data, dict):
            mapping = {}
            for key, value in data.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    value = [value]
                if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v
                                                      for v in value):
                    raise VocabularyError(f"{path}: entry {key!r}: expected a list of output indices")
                mapping[key] = [int(v) for v in value]
            return Vocabulary.from_mapping(mapping, num_classes=num_classes, source=str(path))
        raise VocabularyError(f"{path}: expected a JSON object word -> indices, or a list of class names")
    mapping: dict[str, list[int]] = {}
    for lineno, row in enumerate(csv.reader(text.splitlines(), delimiter="\t"), start=1):
        if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2:
            raise VocabularyError(f"{path}:{lineno}: expected 'word<TAB>index[,index...]'")
        try:
            indices = [int(v) for cell in row[1:] for v in cell.split(",") if v.strip()]
        except ValueError:
            raise VocabularyError(f"{path}:{lineno}: output indices must be integers") from None
        mapping.setdefault(row[0].strip(), []).extend(indices)
    if not mapping:
        raise VocabularyError(f"{path}: no vocabulary entries")
    return Vocabulary.from_mapping(mapping, num_classes=num_classes, source=str(path))
