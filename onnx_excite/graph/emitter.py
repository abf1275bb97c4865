"""A small node emitter: builder code that reads like the backward pass it writes.

`Emitter` appends ONNX nodes and initializers to a graph under construction,
hands out unique tensor names and memoises sub-expressions that several signal
chains share (the normaliser Z of a layer does not depend on the signal).
"""
from __future__ import annotations

import itertools
import sys
import weakref
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class WeightOrigin:
    """How a weight array derives from an initializer ``name`` of the forward model::

        array = layout(part(sign * float32(initializer)))

    ``dtype`` is the initializer's ONNX element type (a Cast to float32 where it is not
    FLOAT); ``negated`` the sign; ``part`` "W", "W+" = max(., 0) or "W-" = min(., 0);
    ``layout`` () as stored, ("T",) a 2-D transpose, or ("flipT", group, shape) a conv weight
    (M, C/g, k...) turned into its stride-1 adjoint's (C, M/g, k...), spatially flipped.
    Used as the initializer's deduplication key (no hash of the bytes) and, with
    ``Emitter.derive_weights``, to compute the array in the graph from the model's own
    initializer (ONNX Runtime folds the derivation once, at session load)."""

    name: str
    dtype: int
    negated: bool = False
    part: str = "W"
    layout: tuple = ()

    def relaid(self, layout: tuple) -> WeightOrigin | None:
        """The origin of this weight laid out as ``layout`` says (``("T",)`` toggles a 2-D
        transpose); None where the two layouts do not compose."""
        if layout == ("T",) and self.layout in ((), ("T",)):
            return replace(self, layout=() if self.layout else ("T",))
        if self.layout == ():
            return replace(self, layout=tuple(layout))
        return None

    @property
    def identity(self) -> bool:
        """The initializer itself (float32, as stored)."""
        return (self.dtype == onnx.TensorProto.FLOAT and not self.negated and self.part == "W"
                and self.layout == ())


class SourcedArray(np.ndarray):
    """A float32 weight array that carries its :class:`WeightOrigin` (``origin``).

    Any numpy operation on it yields an array whose origin is unknown (``None``); only
    negation of a whole weight, :func:`with_origin` and the rules that derive W+/W- and
    layouts say what the result is. Arrays without an origin are deduplicated by content."""

    origin: WeightOrigin | None = None

    def __array_finalize__(self, obj):
        self.origin = None

    def __neg__(self):
        out = super().__neg__()
        if isinstance(out, SourcedArray) and self.origin is not None and self.origin.part == "W":
            out.origin = replace(self.origin, negated=not self.origin.negated)
        return out


def with_origin(array: np.ndarray, origin: WeightOrigin | None) -> np.ndarray:
    """``array`` (no copy) marked as derived from an initializer as ``origin`` says."""
    if origin is None:
        return array
    out = np.asarray(array).view(SourcedArray)
    out.origin = origin
    return out


def origin_of(array) -> WeightOrigin | None:
    return getattr(array, "origin", None) if isinstance(array, SourcedArray) else None


def source_weight(consts: dict, name: str, transposed: bool = False) -> np.ndarray:
    """The initializer ``name`` as float32 (no copy when it is float32), transposed (a view)
    when asked, marked with its origin."""
    raw = consts[name]
    w = raw.astype(np.float32, copy=False)
    if transposed:
        w = w.T
    return with_origin(w, WeightOrigin(name, helper.np_dtype_to_tensor_dtype(raw.dtype), layout=("T",) if transposed else ()))


def derived(array: np.ndarray, result: np.ndarray, part: str) -> np.ndarray:
    """``result``, the ``part`` ("W+" or "W-") of ``array``, marked with the origin that
    says so where ``array`` has one (a whole weight, any sign and layout)."""
    o = origin_of(array)
    if o is None or o.part != "W":
        return result
    return with_origin(result, replace(o, part=part))


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
        self._emitted: dict[tuple, object] = {}   # (op, inputs, outputs, attributes) -> its output(s)
        self._const_cache: dict[tuple, str] = {}
        self.opset = 17  # the default-domain opset of the graph (the builder sets it)
        self._const_by_id: dict[int, tuple] = {}
        self._by_sample: dict[tuple, list] = {}
        #: compute weights that derive from the model's initializers (W+, W-, -W, W^T, the
        #: flipped adjoint kernel) in the graph from that initializer instead of storing them:
        #: the file holds each weight once and ONNX Runtime constant-folds the derivation at
        #: session load (graph optimisation level basic or above)
        self.derive_weights = False
        #: names of the tensors computed from initializers only (constants after folding)
        self.derived_names: set[str] = set()

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
        """An initializer holding ``array`` (deduplicated), or, for an array that carries a
        :class:`WeightOrigin` while ``derive_weights`` is on, the tensor computed from the
        model's initializer. Keys: the origin where there is one (no look at the bytes); the
        same array object again; else dtype, shape and a strided sample of the values, with
        an exact comparison against earlier arrays of the same key (no hash of the bytes)."""
        if origin_of(array) is not None:
            return self.weight(array, hint)
        array = np.asarray(array)
        seen = self._const_by_id.get(id(array))
        if seen is not None and seen[0]() is array:  # the very same array again (Z and adjoint share W+)
            return seen[1]
        if array.nbytes <= 1 << 16:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key not in self._const_cache:
                self._const_cache[key] = self._store(array, hint)
            name = self._const_cache[key]
        else:
            name = self._large_const(array, hint)
        try:
            self._const_by_id[id(array)] = (weakref.ref(array), name)
        except TypeError:  # not weak-referenceable
            pass
        return name

    def weight(self, array: np.ndarray, hint: str = "w", layout: tuple | None = None, compute=None) -> str:
        """The float32 weight ``compute(array)`` (``array`` itself without ``compute``), where
        ``layout`` says what ``compute`` does to the layout (see :class:`WeightOrigin`).

        For an array with an origin: the model's initializer itself where the weight is
        that initializer; with ``derive_weights`` the tensor computed from it in the graph;
        else an initializer keyed by the origin. ``compute`` runs only when the weight is
        stored. Arrays without an origin go to :meth:`const`."""
        origin = origin_of(array)
        if origin is not None and layout is not None:
            origin = origin.relaid(layout)
        if origin is not None:
            if origin.identity or self.derive_weights:
                return self._derive(origin)
            key = ("origin", origin)
            if key not in self._const_cache:
                out = array if compute is None else compute(array)
                self._const_cache[key] = self._store(np.asarray(out).astype(np.float32, copy=False), hint)
            return self._const_cache[key]
        out = array if compute is None else compute(array)
        return self.const(np.asarray(out).astype(np.float32, copy=False), hint)

    def _large_const(self, array: np.ndarray, hint: str) -> str:
        step = max(1, array.size // 4093)
        key = (array.dtype.str, array.shape, np.asarray(array.flat[::step]).tobytes())   # no copy of the whole array
        candidates = self._by_sample.setdefault(key, [])
        for ref, name, tensor in candidates:
            earlier = ref() if ref is not None else None
            if earlier is None:
                earlier = numpy_helper.to_array(tensor)
            if np.array_equal(earlier, array):
                return name
        name, tensor = self._store(array, hint, tensor=True)
        try:
            ref = weakref.ref(array)
        except TypeError:
            ref = None
        candidates.append((ref, name, tensor))
        return name

    def _store(self, array: np.ndarray, hint: str, tensor: bool = False):
        """A new initializer holding ``array`` (its name, and the TensorProto with
        ``tensor``); large float ones go straight into the sink."""
        name = self.fresh(hint)
        if self._sink is not None and array.nbytes > 1 << 16 and array.dtype.kind == "f" and sys.byteorder == "little":
            proto = self._sink.add()
            proto.name = name
            proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            proto.dims.extend(array.shape)
            proto.raw_data = array.tobytes()
        else:
            proto = numpy_helper.from_array(array, name)
            self.initializers.append(proto)
        return (name, proto) if tensor else name

    def _derive(self, origin: WeightOrigin) -> str:
        """The tensor ``origin`` describes, computed from the initializer in the graph; each
        step (Cast, Neg, Relu/Min, Transpose, flip) emitted once and shared."""
        def memo(key, build):
            name = self.memo(("derive",) + key, build)
            self.derived_names.add(name)
            return name

        base = (origin.name, origin.dtype)
        x = origin.name
        if origin.dtype != onnx.TensorProto.FLOAT:
            x = memo(base, lambda: self.op("Cast", [origin.name], hint="w_f32", to=onnx.TensorProto.FLOAT))
        if origin.negated:
            x = memo(base + ("neg",), lambda x=x: self.op("Neg", [x], hint="w_neg"))
        layout = origin.layout
        if layout == ("T",):
            # transposed BEFORE the sign part: a Gemm fed by a Transpose gets it fused back
            # into its transB (ORT's GemmTransposeFusion), which would make it read the same
            # folded W+ as Z's Gemm, and ORT prepacks a Gemm's B only where no other node reads it
            x = memo(base + (origin.negated, "T"), lambda x=x: self.op("Transpose", [x], hint="w_T", perm=[1, 0]))
        key = base + (origin.negated, origin.part, layout == ("T",))
        if origin.part == "W+":
            x = memo(key, lambda x=x: self.op("Relu", [x], hint="w_pos"))
        elif origin.part == "W-":
            x = memo(key, lambda x=x: self.op("Min", [x, self.scalar(0.0)], hint="w_neg_part"))
        if layout and layout[0] == "flipT":
            x = memo(key + layout, lambda x=x: self._flip_transpose(x, layout[1], layout[2]))
        elif layout and layout != ("T",):
            raise ValueError(f"internal: unknown weight layout {layout!r}")
        return x

    def _flip_transpose(self, w: str, group: int, shape: tuple) -> str:
        """Conv weight (M, C/g, k...) -> (C, M/g, k...), flipped on every spatial axis: the
        kernel of the stride-1 adjoint conv (Transpose, Reshapes for groups, Slice step -1)."""
        spatial = list(range(2, len(shape)))
        if group == 1:
            t = self.op("Transpose", [w], hint="w_T", perm=[1, 0] + spatial)
        else:
            m, cg = shape[0], shape[1]
            k = list(shape[2:])
            grouped = self.op("Reshape", [w, self.i64([group, m // group, cg] + k)], hint="w_grouped")
            swapped = self.op("Transpose", [grouped], hint="w_T", perm=[0, 2, 1] + [a + 1 for a in spatial])
            t = self.op("Reshape", [swapped, self.i64([group * cg, m // group] + k)], hint="w_T")
        n = len(spatial)
        return self.op("Slice", [t, self.i64([-1] * n), self.i64([-(2 ** 63)] * n), self.i64(spatial),
                                 self.i64([-1] * n)], hint="w_flip")

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
        """Append one node; returns its output name (or list of names). A node identical to
        one emitted before (op, inputs, attributes) is not emitted again: its outputs are
        returned. Sweeps that coincide (MWP's and c-MWP's above the classifier's input) then
        share their nodes, so :mod:`onnx_excite.graph.share` never stacks two copies of one signal."""
        attrs = {k: v for k, v in attrs.items() if v is not None}
        key = (op_type, tuple(inputs), outputs, tuple(sorted((k, repr(v)) for k, v in attrs.items())))
        if key in self._emitted:
            return self._emitted[key]
        base = hint or op_type.lower()
        outs = [self.fresh(base) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{base}_node"), **attrs))
        self._emitted[key] = outs[0] if outputs == 1 else outs
        return self._emitted[key]

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

    def safe_reciprocal(self, z: str) -> str:
        """1/z (z of any sign) where |z| is above the smallest normal float, exactly 0 elsewhere.

        Written without ``Where`` (ONNX Runtime's CPU Where is ~10x slower than an
        element-wise Mul), as a mask times the reciprocal of a divisor that is never 0::

            m = float(|z| > tiny),   1/z ~ m / (z + (1 - m))

        Where m = 1 the divisor is z itself, so the result is 1/z bit for bit (IEEE
        division is correctly rounded); where m = 0 it is 0 / 1 = 0. Never NaN or Inf.
        A non-negative z needs no mask: see :meth:`safe_divisor`.
        """
        tiny = self.scalar(TINY)
        mask = self.op("Cast", [self.op("Greater", [self.op("Abs", [z]), tiny], hint="z_nonzero")],
                       to=onnx.TensorProto.FLOAT, hint="z_mask")
        return self.op("Div", [mask, self.add(z, self.sub(self.scalar(1.0), mask))], hint="inv_z")

    def safe_divisor(self, z: str, signed: bool) -> tuple[str, str]:
        """What to divide by Z with: ``("Div", Max(Z, Z_FLOOR))`` for a non-negative Z (one
        element-wise node; :data:`Z_FLOOR` says why no mask is needed), else ``("Mul",
        safe_reciprocal(Z))``. Emit it once per normaliser and share it between sweeps;
        :meth:`divide` applies it."""
        if signed:
            return "Mul", self.safe_reciprocal(z)
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

    def class_activation_map(self, p: str, a: str, rank: int, axis: int = 1, plus: bool = False) -> str:
        """Grad-CAM's map before its ReLU: sum over the channel ``axis`` of w_c A_c, with A the
        activation and P its gradient (rank >= 3; the positions are the other non-batch axes).
        Grad-CAM: w_c = the mean of P_c over the positions. Grad-CAM++ (``plus``): w_c = the sum
        over the positions of alpha ReLU(P_c), alpha = P^2 / (2 P^2 + S_c P^3), S_c = the sum of
        A_c over the positions; where ReLU(P) > 0 this is ReLU(P) / (2 + S_c P), emitted so
        (no cube to underflow), 0 where 2 + S_c P is 0."""
        positions = [i for i in range(1, rank) if i != axis]
        if plus:
            total = self.reduce("ReduceSum", a, positions, keepdims=1, hint="cam_act_sum")
            den = self.add(self.scalar(2.0), self.mul(total, p))
            alpha_relu = self.mul(self.relu(p), self.safe_reciprocal(den))
            weights = self.reduce("ReduceSum", alpha_relu, positions, keepdims=1, hint="cam_weights")
        else:
            weights = self.reduce("ReduceMean", p, positions, keepdims=1, hint="cam_weights")
        return self.op("ReduceSum", [self.mul(weights, a), self.i64([axis])], keepdims=0, hint="map")

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
