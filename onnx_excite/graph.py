"""A small node emitter: builder code that reads like the backward pass it writes.

`Emitter` appends ONNX nodes and initializers to a graph under construction,
hands out unique tensor names and memoises sub-expressions that several signal
chains share (the normaliser Z of a layer does not depend on the signal).
"""
from __future__ import annotations

import hashlib
import itertools
import sys
import weakref
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: Below the smallest normal float32 a signed normaliser counts as zero: its share of
#: the signal is dropped instead of overflowing (1 / denormal is +inf).
TINY = float(np.finfo(np.float32).tiny)

#: The floor of a non-negative normaliser: R = P / Max(Z, Z_FLOOR) (2**-64 ~ 5.4e-20).
#: Z = 0 still contributes exactly 0 (every term z_ij of a zero sum of non-negative
#: terms is 0, so the adjoint multiplies R_i by 0), and R stays finite, with no Inf or
#: NaN downstream, while the signal's |values| times the weights stay below 2**64 ~ 1.8e19.
#: A normaliser in (0, Z_FLOOR) passes the share Z / Z_FLOOR of its signal.
Z_FLOOR = 2.0 ** -64


class Emitter:
    """Collects the nodes and initializers of the excitation branch."""

    def __init__(self, taken_names: Iterable[str], prefix: str = "excite", sink=None):
        """``sink``: a model's ``graph.initializer`` to write large initializers into
        directly (one copy of their bytes instead of three: no ``from_array`` + ``extend``);
        ``initializers`` then lists only the small ones, still to be added."""
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._sink = sink
        self._taken = set(taken_names)
        self._prefix = prefix
        self._counter = itertools.count()
        self._memo: dict[Hashable, object] = {}
        self._const_cache: dict[tuple, str] = {}
        self.opset = 17  # the default-domain opset of the graph (the builder sets it)
        self._const_by_id: dict[int, tuple] = {}

    # -- names, constants, memo -------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A tensor/node name not used anywhere in the graph yet."""
        hint = hint.replace(" ", "_")
        while True:
            name = f"{self._prefix}/{hint}_{next(self._counter)}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def const(self, array, hint: str = "const") -> str:
        """An initializer holding ``array`` (deduplicated by content)."""
        array = np.asarray(array)
        seen = self._const_by_id.get(id(array))
        if seen is not None and seen[0]() is array:  # the very same array again (Z and adjoint share W+)
            return seen[1]
        key = (array.dtype.str, array.shape, self._digest(array))
        if key not in self._const_cache:
            name = self.fresh(hint)
            if self._sink is not None and array.nbytes > 1 << 16 and array.dtype.kind == "f" and sys.byteorder == "little":
                tensor = self._sink.add()
                tensor.name = name
                tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
                tensor.dims.extend(array.shape)
                tensor.raw_data = array.tobytes()
            else:
                self.initializers.append(numpy_helper.from_array(array, name))
            self._const_cache[key] = name
        try:
            self._const_by_id[id(array)] = (weakref.ref(array), self._const_cache[key])
        except TypeError:  # not weak-referenceable
            pass
        return self._const_cache[key]

    @staticmethod
    def _digest(array: np.ndarray) -> bytes:
        """Small arrays are keyed by their bytes; large ones by a SHA-256 of their memory
        (read in place for C- or Fortran-ordered arrays), so that the key holds no second
        copy of every weight while the model is built."""
        if array.nbytes <= 1 << 16:
            return array.tobytes()
        if array.flags.c_contiguous:
            return b"C" + hashlib.sha256(array.data).digest()
        if array.flags.f_contiguous:
            return b"F" + hashlib.sha256(array.T.data).digest()
        return b"C" + hashlib.sha256(np.ascontiguousarray(array).data).digest()

    def i64(self, values: Sequence[int], hint: str = "i64") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def scalar(self, value: float, dtype=np.float32) -> str:
        return self.const(np.asarray(value, dtype=dtype), "scalar")

    def memo(self, key: Hashable, build: Callable[[], object]):
        """Emit ``build()`` once per key; later calls reuse the same tensors."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # -- generic node -----------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, outputs: int = 1, **attrs):
        """Append one node; returns its output name (or list of names)."""
        base = hint or op_type.lower()
        outs = [self.fresh(base) for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{base}_node"), **attrs))
        return outs[0] if outputs == 1 else outs

    # -- verbs used by the rules ------------------------------------------------
    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", [a, b])

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b])

    def sub(self, a: str, b: str) -> str:
        return self.op("Sub", [a, b])

    def sum(self, terms: Sequence[str]) -> str:
        terms = list(terms)
        if len(terms) == 1:
            return terms[0]
        if len(terms) == 2:
            return self.add(*terms)
        return self.op("Sum", terms)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def negative_part(self, x: str) -> str:
        """min(x, 0)."""
        return self.op("Min", [x, self.scalar(0.0)], hint="a_neg")

    def shape(self, x: str) -> str:
        return self.memo(("shape", x), lambda: self.op("Shape", [x]))

    def reshape_like(self, x: str, like: str) -> str:
        return self.op("Reshape", [x, self.shape(like)])

    def safe_reciprocal(self, z: str, signed: bool) -> str:
        """1/z where |z| is above the smallest normal float, exactly 0 elsewhere.

        Written without ``Where`` (ONNX Runtime's CPU Where is ~10x slower than an
        element-wise Mul), as a mask times the reciprocal of a divisor that is never 0::

            m = float(|z| > tiny)
            1/z ~ m / Max(z, tiny)         z >= 0 (signed=False): Greater, Cast, Max, Div
            1/z ~ m / (z + (1 - m))        any sign (signed=True)

        Where m = 1 the divisor is z itself, so the result is 1/z bit for bit (IEEE
        division is correctly rounded); where m = 0 it is 0 / (a number >= tiny in
        magnitude) = 0. Never NaN or Inf.
        """
        tiny = self.scalar(TINY)
        mag = self.op("Abs", [z]) if signed else z
        mask = self.op("Cast", [self.op("Greater", [mag, tiny], hint="z_nonzero")], to=onnx.TensorProto.FLOAT,
                       hint="z_mask")
        if signed:
            divisor = self.add(z, self.sub(self.scalar(1.0), mask))
        else:
            divisor = self.op("Max", [z, tiny], hint="z_safe")
        return self.op("Div", [mask, divisor], hint="inv_z")

    def safe_divisor(self, z: str, signed: bool) -> tuple[str, str]:
        """What to divide by Z with: ``("Div", Max(Z, Z_FLOOR))`` for a non-negative Z (one
        element-wise node; :data:`Z_FLOOR` says why no mask is needed), else ``("Mul",
        safe_reciprocal(Z))``. Emit it once per normaliser and share it between sweeps;
        :meth:`divide` applies it."""
        if signed:
            return "Mul", self.safe_reciprocal(z, signed=True)
        return "Div", self.op("Max", [z, self.scalar(Z_FLOOR)], hint="z_safe")

    def divide(self, p: str, divisor: tuple[str, str]) -> str:
        """R = P / Z by a :meth:`safe_divisor`."""
        op, name = divisor
        return self.op(op, [p, name], hint="r")

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 0, hint: str | None = None) -> str:
        """ReduceMax/ReduceMin/... over ``axes`` (attribute before opset 18, input from 18)."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.i64(list(axes))], keepdims=keepdims, hint=hint)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims, hint=hint)

    def epsilon_stabilised(self, z: str, eps: float) -> str:
        """LRP-epsilon's denominator d = z + eps * max|z| * sign(z), sign(0) = +1, the
        maximum taken per sample over all of z's non-batch axes."""
        flat = self.op("Flatten", [z], axis=1)
        peak = self.reduce("ReduceMax", self.op("Abs", [flat]), [1], keepdims=1, hint="max_abs_z")
        sign = self.op("Where", [self.op("GreaterOrEqual", [flat, self.scalar(0.0)]), self.scalar(1.0),
                                 self.scalar(-1.0)], hint="sign_z")
        d = self.add(flat, self.mul(self.mul(peak, self.scalar(eps)), sign))
        return self.reshape_like(d, z)

    def abs_max(self, p: str, rank: int, axis: int = 1) -> str:
        """The gradient-family map: max over the channel ``axis`` of |P| (rank >= 3)."""
        if rank >= 3:
            return self.reduce("ReduceMax", self.op("Abs", [p]), [axis], keepdims=0, hint="map")
        return self.op("Abs", [p], hint="map")

    def l1_normalised(self, m: str, rank: int) -> str:
        """m / sum |m| per sample (over every non-batch axis), exactly 0 where the sum is 0."""
        if rank <= 1:
            total = self.op("Abs", [m])
        else:
            total = self.op("ReduceSum", [self.op("Abs", [m]), self.i64(list(range(1, rank)))], keepdims=1, hint="l1")
        return self.divide(m, self.safe_divisor(total, signed=False))

    def channel_sum(self, p: str, rank: int, axis: int = 1) -> str:
        """The MWP map: sum of P over the channel ``axis`` for rank >= 3 tensors."""
        if rank >= 3:
            return self.op("ReduceSum", [p, self.i64([axis])], keepdims=0, hint="map")
        return self.op("Identity", [p], hint="map")
