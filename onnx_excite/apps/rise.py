"""RISE (Petsiuk, Das and Saenko, BMVC 2018): Randomized Input Sampling for Explanation.

A black-box method: no companion graph, only the plain forward model on masked copies of the
input. For an input x of H x W pixels and ``masks`` = N random masks M_i,

    saliency_t = sum_i score_t(x * M_i) M_i / (N p)

with score_t the target's softmax probability (summed over the target's output indices, as
the faithfulness protocol scores a class of several outputs). Every target of one image comes
from the same N forwards.

The masks are the paper's smooth masks, drawn from ``numpy.random.default_rng(seed)`` in this
order (so a seed gives the same masks whatever the batch size):

1. ``grids = rng.random((N, s, s)) < p``: each of the s x s cells kept with probability p;
2. ``shifts = rng.random((N, 2))``: the shift of mask i is ``floor(shifts[i] * (ch, cw))``,
   ch = ceil(H / s), cw = ceil(W / s) (the cell size in pixels);
3. each grid is upsampled bilinearly (half-pixel centres, the edge cells extended: PyTorch's
   ``interpolate(mode="bilinear", align_corners=False)``) to ((s + 1) ch, (s + 1) cw) and
   cropped to rows dy .. dy + H - 1, columns dx .. dx + W - 1.

The image is masked in the model's input space (x * M after the normalisation): a masked
pixel becomes 0, i.e. the normalisation mean, as the paper's PyTorch code does.
E[M(u)] = p at every pixel, so a model whose output ignores the input gets the map p_t.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..errors import ExciteError

#: the number of masks when none is given: the paper uses 4000 (ResNet-50) to 8000; 1000 is a
#: CPU-friendly default (about 1000 forwards per image)
DEFAULT_MASKS = 1000


@dataclass(frozen=True)
class RiseSettings:
    """How RISE's masks are drawn and run (plain data)."""

    masks: int = DEFAULT_MASKS     # N
    cells: int = 7                 # s: the grid is s x s cells
    p: float = 0.5                 # probability that a cell is kept
    seed: int = 0
    batch_size: int = 32           # masked inputs per forward batch (does not change the map)

    def __post_init__(self):
        for name, value, flag in (("masks", self.masks, "--masks"), ("cells", self.cells, "--mask-cells"),
                                  ("batch_size", self.batch_size, "--mask-batch")):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ExciteError(f"{flag} must be an integer of at least 1, not {value}")
        if not (isinstance(self.p, (int, float)) and 0 < float(self.p) <= 1):
            raise ExciteError(f"--mask-p must be a probability in (0, 1], not {self.p}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise ExciteError(f"--seed must be an integer of at least 0, not {self.seed}")

    @property
    def tag(self) -> str:
        """What the map depends on (the batch size does not): a cache key part."""
        return f"n{int(self.masks)}-s{int(self.cells)}-p{float(self.p):g}-seed{int(self.seed)}"

    def describe(self) -> str:
        return f"{int(self.masks)} masks, {int(self.cells)}x{int(self.cells)} cells, p={float(self.p):g}, seed {int(self.seed)}"

    def to_json(self) -> dict:
        return asdict(self)


def _bilinear_rows(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centres, edges clamped."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w


class MaskSet:
    """The N masks of one settings and one H x W input, drawn once (the grids and shifts:
    N (s^2 + 2) numbers) and built on demand, a chunk at a time."""

    def __init__(self, settings: RiseSettings, height: int, width: int):
        s, n = int(settings.cells), int(settings.masks)
        self.settings, self.height, self.width = settings, int(height), int(width)
        rng = np.random.default_rng(int(settings.seed))
        self.grids = (rng.random((n, s, s)) < float(settings.p)).astype(np.float64)
        self.cell = (math.ceil(self.height / s), math.ceil(self.width / s))
        u = rng.random((n, 2))
        self.shifts = np.floor(u * np.array(self.cell)).astype(np.int64)
        self.rows = _bilinear_rows(s, (s + 1) * self.cell[0])
        self.cols = _bilinear_rows(s, (s + 1) * self.cell[1])

    def __len__(self) -> int:
        return len(self.grids)

    def chunk(self, start: int, stop: int) -> np.ndarray:
        """Masks ``start .. stop - 1`` as a (stop - start, H, W) float32 array."""
        h, w = self.height, self.width
        dy, dx = self.shifts[start:stop, 0], self.shifts[start:stop, 1]
        rows = self.rows[dy[:, None] + np.arange(h)]                 # (B, H, s): the rows of each crop
        cols = self.cols[dx[:, None] + np.arange(w)]                 # (B, W, s)
        return (rows @ self.grids[start:stop] @ cols.transpose(0, 2, 1)).astype(np.float32)


def rise_saliency(forward: Callable[[np.ndarray], np.ndarray], x: np.ndarray, targets: Sequence[Sequence[int]],
                  settings: Optional[RiseSettings] = None,
                  on_progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """(len(targets), H, W) float32 RISE maps of the (C, H, W) input ``x``, one per target (a
    target is a sequence of output indices whose probabilities are summed), all from the same
    forwards. ``forward`` takes a (B, C, H, W) float32 batch and returns (B, K) logits (e.g. an
    :class:`~onnx_excite.apps.eval.perturb.ForwardModel`); the masked inputs are fed in batches
    of ``settings.batch_size``. ``on_progress(masks done, masks)`` after each batch."""
    from .eval.perturb import forward_probabilities

    settings = settings or RiseSettings()
    x = np.asarray(x, np.float32)
    if x.ndim != 3:
        raise ExciteError(f"RISE explains one (C, H, W) input, not an array of shape {x.shape}")
    targets = [tuple(int(i) for i in t) for t in targets]
    if not targets or any(not t for t in targets):
        raise ExciteError("RISE needs at least one target class")
    _, h, w = x.shape
    masks = MaskSet(settings, h, w)
    n = len(masks)
    total = np.zeros((len(targets), h * w), np.float64)
    step = int(settings.batch_size)

    def inputs() -> Iterator[tuple]:
        for start in range(0, n, step):
            chunk = masks.chunk(start, min(n, start + step))
            masked = x[None] * chunk[:, None]                           # (B, C, H, W)
            yield from zip(chunk, masked)

    done = 0
    for keys, prob in forward_probabilities(forward, inputs(), step):
        k = prob.shape[1]
        if max(i for t in targets for i in t) >= k or min(i for t in targets for i in t) < 0:
            raise ExciteError(f"a RISE target is out of range for a model with {k} outputs")
        scores = np.stack([prob[:, list(t)].sum(axis=1) for t in targets])        # (T, B)
        total += scores @ np.stack(keys).reshape(len(keys), -1).astype(np.float64)
        done += len(keys)
        if on_progress is not None:
            on_progress(done, n)
    return (total / (n * float(settings.p))).reshape(len(targets), h, w).astype(np.float32)
