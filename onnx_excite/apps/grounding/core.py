"""Ground a phrase in an image: word maps -> phrase map -> re-ranked proposals.

For a phrase with vocabulary words w_1..w_n (see :mod:`.phrases`):

* word map M_w: the attention map (``method``, c-MWP by default) for a top signal of
  unit sum over the word's output indices C_w. ``weights="predicted"`` (default) weights
  them by the classifier's own posterior restricted to C_w, s_k = softmax(z)_k / sum_{j in
  C_w} softmax(z)_j, so "dog" excites the breeds the model sees rather than all 118
  alike (with a uniform signal over many classes c-MWP's contrast highlights what the
  classes share least: on the bundled dog photo, its legs instead of its head);
  ``weights="uniform"``: s_k = 1/|C_w|. A word naming one class gets the one-hot signal
  either way. The map is upsampled (bicubic) to the original image, clipped at 0 and
  scaled to unit sum;
* phrase map M = (1/n) sum_w M_w (the paper's average);
* every proposal R is scored f(R) = S_R / A_R^gamma (:func:`.scoring.proposal_scores`)
  and the scored boxes go through NMS at IoU ``nms_iou``.

The image is resized so its shorter side is ``size`` (300 by default, as in the paper)
for models that take any size; fixed-size models get their own square input.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ...errors import ExciteError
from . import scoring
from .phrases import ParsedPhrase, parse_phrase
from .vocabulary import Vocabulary, imagenet_vocabulary, load_vocabulary


@dataclass
class Grounding:
    """The ranked boxes of one phrase in one image (original pixel coordinates)."""

    phrase: ParsedPhrase
    boxes: np.ndarray                 # (M, 4) ranked, after NMS
    scores: np.ndarray                # (M,)
    phrase_map: np.ndarray | None     # (H, W) on the original image, None when no word was in the vocabulary
    proposals: int                    # how many proposals were scored
    method: str = "cmwp"
    gamma: float = 0.5

    def to_json(self, top: int | None = None) -> dict:
        n = len(self.boxes) if top is None else min(top, len(self.boxes))
        return {**self.phrase.to_json(), "method": self.method, "gamma": self.gamma, "proposals": self.proposals,
                "boxes": [{"rank": i + 1, "box": [round(float(v), 2) for v in self.boxes[i]],
                           "score": float(self.scores[i])} for i in range(n)]}


def class_weights(logits: np.ndarray | None, indices: Sequence[int]) -> np.ndarray:
    """The word's signal over its classes (unit sum): the softmax of the logits restricted
    to ``indices`` (= the posterior renormalised over them), or uniform for ``logits=None``."""
    idx = np.asarray(list(indices), dtype=np.int64)
    if logits is None or len(idx) == 1:
        return np.full(len(idx), 1.0 / len(idx))
    z = logits[idx] - logits[idx].max()
    e = np.exp(z)
    return e / e.sum()


class Grounder:
    """Holds the model, vocabulary and one Exciter per input size; grounds phrases.

    >>> g = Grounder("default")
    >>> res = g.ground(Image.open("dog.jpg"), "a dog", proposals="selective-search")
    >>> res.boxes[:5]
    """

    def __init__(self, model: str = "default", vocab: Vocabulary | str | Path | None = None, method: str = "cmwp",
                 layer: str | None = None, size: int | None = 300, gamma: float = 0.5, nms_iou: float = 0.7,
                 rule: str = "positive", providers: Sequence[str] | None = None, batch_size: int = 16,
                 cache_size: int = 4, weights: str = "predicted"):
        from onnx_excite.models.resolve import resolve_model

        if not 0.0 <= gamma <= 1.0:
            raise ExciteError(f"gamma must be in [0, 1], not {gamma}")
        if not 0.0 < nms_iou <= 1.0:
            raise ExciteError(f"the NMS IoU threshold must be in (0, 1], not {nms_iou}")
        if size is not None and size < 32:
            raise ExciteError(f"image size {size} is too small (at least 32 pixels)")
        self.model_name = model
        resolved = resolve_model(model, fully_conv=True)
        self.model, self.profile = resolved.model, resolved.profile
        self.layer = layer or (self.profile.default_layers[0] if self.profile.default_layers else None)
        if self.layer is None:
            raise ExciteError("no layer given and the model has no profile default: pass --layer "
                              "(see `onnx-excite layers MODEL`)")
        if weights not in ("predicted", "uniform"):
            raise ExciteError(f"class weights must be 'predicted' or 'uniform', not {weights!r}")
        self.method, self.gamma, self.nms_iou, self.rule = method, float(gamma), float(nms_iou), rule
        self.weights = weights
        self.size = size if self.profile.resize == "shorter" else self.profile.input_size
        self.providers, self.batch_size, self.cache_size = providers, max(1, int(batch_size)), cache_size
        self._exciters: OrderedDict = OrderedDict()
        self.vocab = self._vocabulary(vocab)

    # -- set-up ---------------------------------------------------------------------------
    def _vocabulary(self, vocab) -> Vocabulary:
        if isinstance(vocab, Vocabulary):
            result = vocab
        elif vocab is not None:
            result = load_vocabulary(vocab)
        elif self.model_name == "default":
            result = imagenet_vocabulary()
        elif self.profile.class_names:
            result = Vocabulary.from_class_names(self.profile.load_class_names(), source="the model's class names")
        else:
            raise ExciteError("this model has no class names: pass a vocabulary file (--vocab, JSON or TSV)")
        k = self.num_classes
        bad = [(w, i) for w, idx in result.entries.items() for i in idx if i >= k]
        if bad:
            raise ExciteError(f"vocabulary {result.source}: word {bad[0][0]!r} names output {bad[0][1]}, "
                              f"but the model has {k} outputs")
        return result

    def exciter(self, shape: tuple):
        """The Exciter for inputs of this (C, H, W) / (H, W, C) shape (a small LRU cache)."""
        if shape in self._exciters:
            self._exciters.move_to_end(shape)
            return self._exciters[shape]
        from ...graph.canonicalize import first_input_name
        from ...run.runtime import Exciter

        ex = Exciter(self.model, [self.layer], methods=(self.method,), rule=self.rule, providers=self.providers,
                     input_shapes={first_input_name(self.model): [None, *shape]})
        self._exciters[shape] = ex
        while len(self._exciters) > self.cache_size:
            self._exciters.popitem(last=False)
        return ex

    @property
    def num_classes(self) -> int:
        if not hasattr(self, "_num_classes"):
            import onnx

            from ...graph.canonicalize import load_model

            proto = self.model if isinstance(self.model, onnx.ModelProto) else load_model(self.model)
            out = proto.graph.output[0].type.tensor_type.shape.dim
            k = out[-1].dim_value if len(out) and out[-1].HasField("dim_value") else 0
            if not k:
                k = self.exciter_for_any().num_classes
            self._num_classes = int(k)
        return self._num_classes

    def exciter_for_any(self):
        c = len(self.profile.mean)
        shape = (c, self.size, self.size) if self.profile.layout == "NCHW" else (self.size, self.size, c)
        return self.exciter(shape)

    # -- maps -----------------------------------------------------------------------------
    def prepare(self, image):
        from ...io.images import preprocess

        p = self.profile
        return preprocess(image, size=self.size, resize=p.resize, crop=None, mean=p.mean, std=p.std,
                          scale=p.scale, channel_order=p.channel_order, layout=p.layout)

    def word_maps(self, image, words: Iterable[tuple[str, Sequence[int]]]) -> dict[str, np.ndarray]:
        """key -> the word's map on the original image (H, W), >= 0, unit sum (all zero
        when the map is empty). One batched run per ``batch_size`` words."""
        from ...render.maps import to_image_space

        unique = list(OrderedDict((k, tuple(v)) for k, v in words).items())
        if not unique:
            return {}
        arr, prepared = self.prepare(image)
        ex = self.exciter(arr.shape)
        k = ex.num_classes
        logits = ex.logits(arr[None])[0].astype(np.float64) if self.weights == "predicted" else None
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start:start + self.batch_size]
            signal = np.zeros((len(chunk), k), np.float32)
            for row, (_, indices) in enumerate(chunk):
                signal[row, list(indices)] = class_weights(logits, indices)
            res = ex.explain(np.repeat(arr[None], len(chunk), axis=0), signal)
            maps = res.maps[self.method][self.layer]
            for row, (key, _) in enumerate(chunk):
                up = np.maximum(to_image_space(maps[row], prepared), 0).astype(np.float64)
                total = up.sum()
                out[key] = up / total if total > 0 and np.isfinite(total) else np.zeros_like(up)
        return out

    def phrase_map(self, parsed: ParsedPhrase, word_maps: dict[str, np.ndarray]) -> np.ndarray | None:
        """The average of the phrase's word maps (None when it has no vocabulary word)."""
        if not parsed.words:
            return None
        return np.mean([word_maps[k] for k in parsed.keys], axis=0)

    def parse(self, phrase: str) -> ParsedPhrase:
        return parse_phrase(phrase, self.vocab)

    # -- ranking --------------------------------------------------------------------------
    def rank(self, parsed: ParsedPhrase, phrase_map: np.ndarray | None, proposals: np.ndarray,
             gamma: float | None = None) -> Grounding:
        gamma = self.gamma if gamma is None else gamma
        boxes = scoring.as_boxes(proposals)
        if phrase_map is None or len(boxes) == 0:
            ranked, scores = boxes[:0], np.zeros(0)
        else:
            ranked, scores = scoring.rank_boxes(phrase_map, boxes, gamma, self.nms_iou)
        return Grounding(parsed, ranked, scores, phrase_map, len(boxes), self.method, gamma)

    def ground(self, image, phrase: str, proposals, key: str = "", gamma: float | None = None) -> Grounding:
        """Rank ``proposals`` (a boxes array, or a source: see :func:`.proposals.proposal_source`)
        for ``phrase`` in ``image`` (a PIL image or a path)."""
        from ...io.images import load_image
        from .proposals import proposal_source

        if isinstance(image, (str, Path)):
            key = key or Path(image).stem
            image = load_image(image)
        parsed = self.parse(phrase)
        if isinstance(proposals, (np.ndarray, list)):
            boxes = scoring.as_boxes(proposals)
        else:
            boxes = proposal_source(proposals).boxes(image, key)
        maps = self.word_maps(image, parsed.words)
        return self.rank(parsed, self.phrase_map(parsed, maps), boxes, gamma)


def ground(model: str, image, phrase: str, proposals="selective-search", vocab=None, method: str = "cmwp",
           gamma: float = 0.5, size: int | None = 300, layer: str | None = None, nms_iou: float = 0.7,
           weights: str = "predicted") -> Grounding:
    """One-shot :meth:`Grounder.ground` (build a :class:`Grounder` to ground many phrases)."""
    return Grounder(model, vocab=vocab, method=method, layer=layer, size=size, gamma=gamma,
                    nms_iou=nms_iou, weights=weights).ground(image, phrase, proposals)
