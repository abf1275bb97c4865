"""Phrase -> vocabulary words.

The phrase is lower-cased and split into words (:func:`~.vocabulary.words_of`). From
left to right the longest run of words that is a vocabulary key is taken ("a golden
retriever" -> "golden retriever", not "golden" + "retriever"); a word that starts no
key is a stop word (skipped silently is not enough: it is reported as ``stop``) or out
of vocabulary (reported as ``oov``). A plural or possessive is tried in its singular
form when the word itself is not a key ("dogs" -> "dog", "buses" -> "bus", "puppies" ->
"puppy", "men" -> "man", "dog's" -> "dog").
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .vocabulary import Vocabulary, words_of

#: English function words and a few caption fillers; never looked up
STOP_WORDS = frozenset("""
a an the this that these those some any each every other another such
of in on at to from by with without into onto over under above below near behind beside between
through across along around about against among up down out off for as
and or but nor so yet
is are was were be been being am do does did has have had
his her its their our your my him them they he she it we you i me us
one two three four five six seven eight nine ten several many few lot lots group couple pair
very just only also there here
""".split())

_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
              "teeth": "tooth", "mice": "mouse", "geese": "goose", "oxen": "ox", "knives": "knife",
              "wolves": "wolf", "leaves": "leaf", "calves": "calf", "sheep": "sheep", "fish": "fish"}


def singular_forms(word: str) -> list[str]:
    """Candidate singulars of ``word``, most specific first (may be empty)."""
    if word.endswith("'s"):
        return [word[:-2]]
    if word.endswith("s'"):
        return [word[:-1], word[:-2]]
    out = []
    if word in _IRREGULAR:
        out.append(_IRREGULAR[word])
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])
    return out


@dataclass
class ParsedPhrase:
    """``words``: the vocabulary keys found, in order, each with its output indices;
    ``stop`` and ``oov``: the words skipped, as written (lower-case)."""

    text: str
    words: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    oov: list[str] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.words]

    def to_json(self) -> dict:
        return {"phrase": self.text, "words": self.keys, "stop_words": self.stop, "out_of_vocabulary": self.oov}


def _lookup(vocab: Vocabulary, tokens: list[str]) -> str | None:
    key = " ".join(tokens)
    if key in vocab:
        return key
    # singular of the last word only ("golden retrievers" -> "golden retriever")
    for form in singular_forms(tokens[-1]):
        cand = " ".join(tokens[:-1] + [form]) if form else None
        if cand and cand in vocab:
            return cand
    return None


def parse_phrase(text: str, vocab: Vocabulary, stop_words=STOP_WORDS) -> ParsedPhrase:
    """Split ``text`` into vocabulary words, stop words and out-of-vocabulary words."""
    tokens = words_of(text)
    parsed = ParsedPhrase(text=text)
    longest = vocab.max_words
    i = 0
    while i < len(tokens):
        found = None
        for n in range(min(longest, len(tokens) - i), 0, -1):
            if n == 1 and tokens[i] in stop_words:
                break
            key = _lookup(vocab, tokens[i:i + n])
            if key is not None:
                found = (key, n)
                break
        if found is not None:
            key, n = found
            parsed.words.append((key, vocab[key]))
            i += n
            continue
        (parsed.stop if tokens[i] in stop_words else parsed.oov).append(tokens[i])
        i += 1
    return parsed
