"""Deletion / insertion curves (Petsiuk et al., RISE, BMVC 2018) and ROAD's MoRF / LeRF
(Rong et al., ICML 2022) for one preprocessed image, batched through a forward model.

A saliency map at the input resolution orders the pixels (:func:`removal_ranks`: most
salient first; ties broken by a seeded random order shared by every map of the image).
:func:`step_counts` gives the number of pixels changed after each step, from 0 to all.

* **deletion**: the image with its first ``k`` pixels replaced by a substrate (``zero``: 0 in
  the model's input space, i.e. the normalisation mean; ``mean``: the image's per-channel
  mean; ``blur``: a Gaussian-blurred copy);
* **insertion**: a blurred copy of the image with its first ``k`` pixels set back to the image;
* **morf** / **lerf** (``imputation="road"``): the first ``k`` pixels (most / least relevant
  first) replaced by ROAD's noisy linear imputation: each removed pixel the weighted mean of
  its 8 neighbours (1/6 direct, 1/12 diagonal, the known pixels fixed; solved by successive
  over-relaxation), plus Gaussian noise.

Every step is one input of a batch: the steps of several curves share batches of
``batch_size`` inputs of one ONNX Runtime session (:class:`ForwardModel`). The value of a step
is the target's probability: softmax of the logits, summed over the target's output indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from ...errors import ExciteError

#: curve name -> which direction is better ("lower" area or "higher")
CURVES = {"deletion": "lower", "insertion": "higher", "morf": "lower", "lerf": "higher"}
IMPUTATIONS = ("fixed", "road")
SUBSTRATES = ("zero", "mean", "blur")


@dataclass(frozen=True)
class Perturbation:
    """How the curves of an image are made (plain data)."""

    steps: int = 32                      # steps from none to all pixels (steps + 1 points)
    step_pixels: Optional[int] = None    # or: pixels per step (the last step may be smaller)
    baseline: str = "zero"               # deletion substrate: zero | mean | blur
    blur_sigma: float = 5.0              # the blurred copy (insertion start; baseline blur), in input pixels
    imputation: str = "fixed"            # fixed (deletion + insertion) | road (morf + lerf)
    road_noise: float = 0.01             # ROAD: noise std added to the imputed pixels (input units)
    batch_size: int = 32

    def __post_init__(self):
        if self.imputation not in IMPUTATIONS:
            raise ExciteError(f"unknown imputation {self.imputation!r}; use {' or '.join(IMPUTATIONS)}")
        if self.baseline not in SUBSTRATES:
            raise ExciteError(f"unknown baseline {self.baseline!r}; use {', '.join(SUBSTRATES)}")
        if self.step_pixels is None and (int(self.steps) != self.steps or self.steps < 1):
            raise ExciteError(f"--steps must be an integer of at least 1, not {self.steps}")
        if self.step_pixels is not None and (int(self.step_pixels) != self.step_pixels or self.step_pixels < 1):
            raise ExciteError(f"--step-pixels must be an integer of at least 1, not {self.step_pixels}")
        if not (np.isfinite(self.blur_sigma) and self.blur_sigma >= 0):
            raise ExciteError(f"--blur-sigma must be a number >= 0, not {self.blur_sigma}")
        if not (np.isfinite(self.road_noise) and self.road_noise >= 0):
            raise ExciteError(f"the ROAD noise must be a number >= 0, not {self.road_noise}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ExciteError(f"--batch-size must be an integer of at least 1, not {self.batch_size}")

    @property
    def curves(self) -> tuple:
        return ("deletion", "insertion") if self.imputation == "fixed" else ("morf", "lerf")

    def describe(self) -> str:
        steps = f"{self.step_pixels} pixels per step" if self.step_pixels else f"{self.steps} steps"
        if self.imputation == "road":
            return f"ROAD noisy linear imputation (noise {self.road_noise:g}), {steps}"
        return f"deletion to {self.baseline}, insertion from a blur (sigma {self.blur_sigma:g} px), {steps}"


# ---------------------------------------------------------------------------
# orders and steps
# ---------------------------------------------------------------------------
def removal_ranks(saliency: np.ndarray, tiebreak: Optional[np.ndarray] = None) -> np.ndarray:
    """``(H*W,)`` int: each pixel's place in the removal order (0 first): decreasing saliency,
    ties in increasing ``tiebreak`` (then row-major); NaN counts as least salient."""
    s = np.asarray(saliency, np.float64).ravel()
    s = np.where(np.isnan(s), -np.inf, s)
    keys = (-s,) if tiebreak is None else (np.asarray(tiebreak, np.float64).ravel(), -s)
    order = np.lexsort(keys)
    ranks = np.empty(s.size, np.int64)
    ranks[order] = np.arange(s.size)
    return ranks


def step_counts(n_pixels: int, steps: int = 32, step_pixels: Optional[int] = None) -> np.ndarray:
    """Pixels changed after each step: 0, ..., ``n_pixels`` (``steps`` equal steps, rounded, or
    ``step_pixels`` per step)."""
    if step_pixels:
        k = np.arange(0, n_pixels, int(step_pixels), dtype=np.int64)
        return np.append(k, n_pixels)
    return np.round(np.linspace(0, n_pixels, int(steps) + 1)).astype(np.int64)


# ---------------------------------------------------------------------------
# substrates
# ---------------------------------------------------------------------------
def blurred_copy(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each channel of a (C, H, W) image."""
    from ...render.postprocess import gaussian_blur

    return gaussian_blur(x, sigma).astype(np.float32) if sigma > 0 else x.copy()


def substrate(x: np.ndarray, kind: str, sigma: float) -> np.ndarray:
    if kind == "zero":
        return np.zeros_like(x)
    if kind == "mean":
        return np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape).astype(np.float32)
    return blurred_copy(x, sigma)


_NEIGHBOURS = [((-1, 0), 1 / 6), ((1, 0), 1 / 6), ((0, -1), 1 / 6), ((0, 1), 1 / 6),
               ((-1, -1), 1 / 12), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((1, 1), 1 / 12)]


def road_impute(x: np.ndarray, removed: np.ndarray, rng: Optional[np.random.Generator] = None, noise: float = 0.01,
                start: Optional[np.ndarray] = None, sweeps: int = 40, omega: float = 1.7) -> np.ndarray:
    """ROAD's noisy linear imputation of the ``removed`` (H, W) pixels of ``x`` (C, H, W): each
    removed pixel the weighted mean of its in-image neighbours (direct 1/6, diagonal 1/12),
    the others fixed; ``sweeps`` of successive over-relaxation over the four pixel parities
    (no two 8-neighbours share one), from ``start`` (default: the mean of the kept pixels),
    then Gaussian noise of std ``noise`` on the removed pixels (none without ``rng``)."""
    removed = np.asarray(removed, bool)
    if not removed.any():
        return x.copy()
    c, h, w = x.shape
    work = np.array(x if start is None else start, np.float32, copy=True)
    if start is None:
        kept = ~removed
        fill = x[:, kept].mean(axis=1) if kept.any() else np.zeros(c, np.float32)
        work[:, removed] = fill[:, None]
    work[:, ~removed] = x[:, ~removed]
    pad = np.zeros((c, h + 2, w + 2), np.float32)
    pad[:, 1:-1, 1:-1] = work
    ones = np.zeros((1, h + 2, w + 2), np.float32)
    ones[:, 1:-1, 1:-1] = 1.0
    lattices = []
    for py in (0, 1):
        for px in (0, 1):
            ny, nx = len(range(py, h, 2)), len(range(px, w, 2))
            m = removed[py::2, px::2]
            if ny == 0 or nx == 0 or not m.any():
                continue

            def view(a, dy, dx, py=py, px=px, ny=ny, nx=nx):
                return a[:, 1 + py + dy: 2 + py + dy + 2 * (ny - 1): 2, 1 + px + dx: 2 + px + dx + 2 * (nx - 1): 2]

            norm = sum(wt * view(ones, dy, dx) for (dy, dx), wt in _NEIGHBOURS)
            lattices.append((view, np.broadcast_to(m, (c,) + m.shape), (omega / norm).astype(np.float32)))
    for _ in range(int(sweeps)):
        for view, m, scale in lattices:
            acc = view(pad, -1, 0) + view(pad, 1, 0)
            acc += view(pad, 0, -1)
            acc += view(pad, 0, 1)
            diag = view(pad, -1, -1) + view(pad, -1, 1)
            diag += view(pad, 1, -1)
            diag += view(pad, 1, 1)
            acc *= 2.0
            acc += diag
            acc *= scale / 12.0            # omega * weighted mean
            centre = view(pad, 0, 0)
            acc += (1 - omega) * centre
            np.copyto(centre, acc, where=m)
    out = pad[:, 1:-1, 1:-1].copy()
    if noise > 0 and rng is not None:
        out[:, removed] += rng.normal(0.0, noise, size=(c, int(removed.sum()))).astype(np.float32)
    return out


# ---------------------------------------------------------------------------
# curves
# ---------------------------------------------------------------------------
@dataclass
class CurveJob:
    """One curve: the image, its removal ranks, the step counts, the target's output indices."""

    kind: str                     # deletion | insertion | morf | lerf
    ranks: np.ndarray
    counts: np.ndarray
    target: tuple


def _step_inputs(x: np.ndarray, job: CurveJob, settings: Perturbation, cache: dict,
                 rng: np.random.Generator) -> Iterable[np.ndarray]:
    """The perturbed (C, H, W) inputs of one curve, one per step."""
    hw = job.ranks.reshape(x.shape[1:])
    if job.kind in ("deletion", "insertion"):
        if "blur" not in cache:
            cache["blur"] = blurred_copy(x, settings.blur_sigma)
        if job.kind == "deletion":
            if "base" not in cache:
                cache["base"] = cache["blur"] if settings.baseline == "blur" else substrate(x, settings.baseline, 0)
            start, end = x, cache["base"]
        else:
            start, end = cache["blur"], x
        for k in job.counts:
            yield np.where((hw < k)[None], end, start)
        return
    # ROAD: pixels removed most (morf) or least (lerf) relevant first, each step imputed afresh,
    # warm-started from the previous step (its removed pixels are a subset)
    order = hw if job.kind == "morf" else hw.size - 1 - hw
    prev = None
    for k in job.counts:
        removed = order < k
        prev = road_impute(x, removed, None, 0.0, start=prev)      # the noiseless solution: next start
        noisy = prev.copy()
        if settings.road_noise > 0 and removed.any():
            noisy[:, removed] += rng.normal(0.0, settings.road_noise,
                                            size=(x.shape[0], int(removed.sum()))).astype(np.float32)
        yield noisy


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, K) logits in float64."""
    z = np.asarray(logits, np.float64).reshape(len(logits), -1)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def forward_probabilities(forward: Callable[[np.ndarray], np.ndarray], items: Iterable[tuple],
                          batch_size: int) -> Iterator[tuple]:
    """Feed the ``(key, (C, H, W) input)`` pairs of ``items`` (read lazily) to ``forward`` (a
    (B, C, H, W) float32 batch -> (B, K) logits) in batches of ``batch_size``; yield
    ``(keys, probabilities)`` per batch: the batch's keys and the (B, K) float64 softmax."""
    keys: list = []
    batch: list = []

    def flush():
        logits = np.asarray(forward(np.stack(batch).astype(np.float32, copy=False)))
        if logits.shape[0] != len(batch):
            raise ExciteError(f"the model returned {logits.shape[0]} rows for a batch of {len(batch)}")
        return list(keys), softmax(logits.reshape(len(batch), -1))

    for key, inp in items:
        keys.append(key)
        batch.append(inp)
        if len(batch) == batch_size:
            yield flush()
            keys.clear()
            batch.clear()
    if batch:
        yield flush()


def run_curves(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray, jobs: Sequence[CurveJob],
               settings: Perturbation, seed: int = 0) -> list:
    """The probability curve (one value per step) of every job on the (C, H, W) image ``x``,
    the steps of all jobs fed to ``forward`` (a (B, C, H, W) float32 batch -> (B, K) logits) in
    batches of ``settings.batch_size`` (:func:`forward_probabilities`)."""
    cache: dict = {}
    rng = np.random.default_rng(seed)
    curves = [np.empty(len(j.counts)) for j in jobs]

    def items():
        for j, job in enumerate(jobs):
            for s, inp in enumerate(_step_inputs(x, job, settings, cache, rng)):
                yield (j, s), inp

    for keys, p in forward_probabilities(forward, items(), settings.batch_size):
        for row, (j, s) in enumerate(keys):
            curves[j][s] = p[row, list(jobs[j].target)].sum()
    return curves


# ---------------------------------------------------------------------------
# the forward model
# ---------------------------------------------------------------------------
class ForwardModel:
    """One ONNX Runtime session of the plain forward model (canonicalized as the companion
    graphs are, the explained logits as its output): ``logits(batch)`` with batch (B, C, H, W)."""

    def __init__(self, source, logits: Optional[str] = None, layout: str = "NCHW", device: str = "auto",
                 threads: Optional[int] = None):
        from ...graph.canonicalize import canonicalize
        from ...run.devices import providers_for
        from ...run.runtime import make_session
        from .compute import ModelError

        try:
            self.forward = canonicalize(source, logits=logits)
            self.session = make_session(self.forward.forward_model(copy_model=False), providers_for(device), threads)
        except ExciteError as exc:
            raise ModelError(str(exc)) from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                             "faithfulness and RISE need a model with one image input")
        self.input, self.input_type, self.layout = inputs[0].name, inputs[0].type, layout
        self.output = self.forward.entry
        self.runs = 0          # inputs fed so far

    def logits(self, batch: np.ndarray) -> np.ndarray:
        from ...run.runtime import as_input_dtype
        from .compute import ModelError

        arr = np.asarray(batch, np.float32)
        if self.layout == "NHWC":
            arr = arr.transpose(0, 2, 3, 1)
        try:
            out = self.session.run([self.output], {self.input: as_input_dtype(np.ascontiguousarray(arr),
                                                                              self.input_type)})[0]
        except Exception as exc:
            raise ModelError(f"ONNX Runtime failed: {str(exc).splitlines()[0][:300]}") from None
        self.runs += len(arr)
        return np.asarray(out).reshape(len(arr), -1)

    __call__ = logits
