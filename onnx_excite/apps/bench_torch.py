"""PyTorch peers for ``bench``: TorchRay's and zennit's excitation backprop on the same weights.

The forward graph the benchmark runs in ONNX Runtime (the canonical forward model,
BatchNorm folded) is converted to a ``torch.nn.Module`` by ``onnx2torch``, so both
sides hold the same float32 weights. Two modules are then swapped so that the peers'
excitation rules reach them (neither library hooks onnx2torch's own modules):

* ``GlobalAveragePool`` -> ``nn.AdaptiveAvgPool2d(1)`` (TorchRay patches
  ``F.adaptive_avg_pool2d``, zennit's ``Norm`` rule hooks ``_AdaptiveAvgPoolNd``);
* ``Add`` of two activations (residual sums) -> :class:`ResidualSum`, which calls
  TorchRay's ``eltwise_sum`` or zennit's ``Sum`` layer, as each library asks of residual
  networks, and plain ``a + b`` for the forward alone.

What is timed (:func:`run_peers`), with ``torch.set_num_threads`` = ORT's intra-op threads:

* ``forward``: ``model(x)`` under ``torch.inference_mode()``;
* TorchRay ``excitation_backprop(model, x, target, saliency_layer=...)``: forward +
  backward with its patched conv / linear / average-pool backward,
  ``P_in = a * W+^T (P_out / (a W+ + 1e-20))`` (the paper's rule, our ``rule="paper"``;
  on ReLU networks it equals our default ``positive``), MaxPool and ReLU by their plain
  gradient (all of P to the arg-max; P is 0 where a = 0 anyway);
* TorchRay ``contrastive_excitation_backprop``: two forward + backward passes, the
  classifier's weights negated in the first, the dual's P subtracted at the classifier's
  input (``contrast_layer``) in the second, the channel sum clipped at 0;
* zennit ``composites.ExcitationBackprop(zero_params=["bias"])`` with its hooks registered
  once (as a user explaining many images would): ``ZPlus`` at Conv / Linear,
  ``Z = a+ W+ + a- W-`` (our ``positive`` rule; ``zero_params=["bias"]`` keeps the bias
  out of Z as the paper and we do: zennit's default adds ``b+``), stabiliser
  ``Z + 1e-6 sign(Z)``; ``Norm`` (proportional) at average pools and sums.

Every map is the channel sum of P at the layer (N, h, w), like our ``mwp:<layer>``.
Ops neither library handles (Clip / ReLU6, Mul gates, Concat ...) keep their plain
gradient in the peers, where our rules pass P through: on such models the maps differ
there, the cost does not.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper

from ..errors import ExciteError

#: peer name -> the Python modules it needs (import names), beside torch and onnx2torch
PEERS = {"torchray": ("torchray",), "zennit": ("zennit",)}
#: what to install when one is missing
INSTALL_HINT = "pip install 'onnx-excite[bench]'"
INPUT = "input"   # the map layer name meaning "the model input" when the input tensor has another name


@dataclass
class PeerRow:
    library: str          # torch, TorchRay, zennit
    name: str             # forward, excitation backprop, contrastive EB
    median_ms: float
    ratio: float          # median / median of the torch forward alone
    min_ms: float = float("nan")   # the fastest round (less load-dependent than the median)


@dataclass
class PeerReport:
    rows: list[PeerRow]
    layer: str
    threads: int
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def missing_modules(peers: Sequence[str]) -> list[str]:
    """The import names that ``peers`` need and that are not installed."""
    import importlib.util

    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ExciteError(f"unknown --compare {unknown[0]!r}: expected one of {', '.join(PEERS)}")
    wanted = ["torch", "onnx2torch"] + [m for p in dict.fromkeys(peers) for m in PEERS[p]]
    return [m for m in wanted if importlib.util.find_spec(m) is None]


def require(peers: Sequence[str]) -> None:
    """Raise one :class:`ExciteError` line naming the ``bench`` extra when a peer's libraries are missing."""
    missing = missing_modules(peers)
    if missing:
        raise ExciteError(f"--compare {' --compare '.join(dict.fromkeys(peers))} needs {', '.join(missing)} "
                          f"(not installed): {INSTALL_HINT}")


def default_threads() -> int:
    """torch's default intra-op thread count (one per physical core, as ORT's)."""
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------------
# the torch model
# ---------------------------------------------------------------------------
def _residual_sum_class():
    import torch
    from torch import nn

    class ResidualSum(nn.Module):
        """``a + b`` of two activations. ``mode``: ``plain`` (``a + b``), ``torchray``
        (TorchRay's ``eltwise_sum``, whose patched backward is ``P_k = x_k / (sum x) * P``),
        ``zennit`` (``Sum`` over the stacked inputs, hooked by the composite's ``Norm`` rule,
        ``P_k = x_k / (sum x + eps) * P``)."""

        def __init__(self, stack_sum=None):
            super().__init__()
            self.mode = "plain"
            if stack_sum is not None:
                self.stack_sum = stack_sum

        def forward(self, a, b):
            if self.mode == "torchray":
                from torchray.attribution import excitation_backprop as eb

                return eb.eltwise_sum(a, b)   # looked up per call: TorchRay patches the module attribute
            if self.mode == "zennit":
                return self.stack_sum(torch.stack(torch.broadcast_tensors(a, b), dim=-1))
            return a + b

    return ResidualSum


@dataclass
class TorchPeer:
    """The converted model and where our tensor names live in it."""

    module: object                     # nn.Sequential(input=nn.Identity(), net=<onnx2torch GraphModule>)
    input_name: str
    layer_modules: dict[str, str]      # ONNX tensor name -> name of the module that outputs it (``net.n<i>``)
    classifier: str | None             # module of the classifier (Gemm/MatMul/Conv below the logits)
    contrast: str | None               # module whose output is the classifier's input
    sums: list = field(default_factory=list)   # the ResidualSum modules

    def set_sum_mode(self, mode: str) -> None:
        for s in self.sums:
            s.mode = mode

    def module_for(self, layer: str) -> str:
        """The module whose output is ``layer`` (``input``, an ``nn.Identity``, for the model input)."""
        if layer in (self.input_name, INPUT):
            return "input"
        if layer not in self.layer_modules:
            raise ExciteError(f"layer {layer!r} is not the output of a node of the converted torch model")
        return self.layer_modules[layer]


def _pruned_to_logits(forward) -> onnx.ModelProto:
    """The forward graph with only the nodes the logits need, one output (the logits),
    nodes renamed ``n<i>`` (onnx2torch names its modules after the nodes)."""
    graph = forward.model.graph
    needed, stack = set(), [forward.entry]
    producer = {o: n for n in graph.node for o in n.output}
    keep = set()
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        node = producer.get(t)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = []
    for i, node in enumerate(n for n in graph.node if id(n) in keep):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"n{i}"
        nodes.append(copy)
    inits = [t for t in graph.initializer if t.name in needed]
    inputs = [v for v in graph.input if v.name in needed and v.name not in {t.name for t in inits}]
    value_info = [v for v in graph.value_info if v.name in needed]
    out = next((v for v in list(graph.output) + list(graph.value_info) if v.name == forward.entry), None)
    if out is None:
        out = helper.make_tensor_value_info(forward.entry, onnx.TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, graph.name or "forward", inputs, [out], inits, value_info=value_info)
    model = helper.make_model(g, opset_imports=list(forward.model.opset_import))
    model.ir_version = forward.model.ir_version
    return model


def torch_peer(forward) -> TorchPeer:
    """Convert a canonical forward graph (:func:`onnx_excite.graph.canonicalize.canonicalize`) to
    torch with onnx2torch (same weights) and swap global average pools and residual sums
    for modules the peers handle (see the module docstring)."""
    import onnx2torch
    from torch import nn

    from ..graph.builder import find_classifier

    pruned = _pruned_to_logits(forward)
    if len(pruned.graph.input) != 1:
        raise ExciteError(f"the PyTorch comparison needs a model with one input, this one has {len(pruned.graph.input)}")
    try:
        module = onnx2torch.convert(pruned)
    except Exception as exc:  # onnx2torch raises NotImplementedError / KeyError ... for ops it lacks
        raise ExciteError(f"onnx2torch cannot convert this model for the PyTorch comparison: {type(exc).__name__}: {exc}") \
            from None
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    names = {name for name, _ in module.named_children()}
    layer_modules = {}
    for node in pruned.graph.node:
        if node.name in names:
            for o in node.output:
                layer_modules[o] = f"net.{node.name}"
    stack_sum = None
    try:
        from zennit.layer import Sum as _ZSum
        stack_sum = _ZSum
    except ImportError:
        pass
    ResidualSum = _residual_sum_class()
    sums = []
    for node in pruned.graph.node:
        if node.name not in names:
            continue
        if node.op_type == "GlobalAveragePool" and len(forward.shape(node.input[0]) or ()) == 4:
            setattr(module, node.name, nn.AdaptiveAvgPool2d(1))
        elif node.op_type == "Add" and len(node.input) == 2 and not any(forward.is_const(i) for i in node.input):
            s = ResidualSum(stack_sum() if stack_sum is not None else None)
            setattr(module, node.name, s)
            sums.append(s)
    classifier = contrast = None
    try:
        clf = find_classifier(forward, set())
        classifier = layer_modules.get(clf.output[0])
        contrast = layer_modules.get(clf.input[0])
    except ExciteError:
        pass
    # an Identity in front, so that the input is a module's output like every other layer
    # (TorchRay's contrastive EB probes module outputs only)
    wrapped = nn.Sequential(OrderedDict(input=nn.Identity(), net=module)).eval()
    return TorchPeer(wrapped, pruned.graph.input[0].name, layer_modules, classifier, contrast, sums)


# ---------------------------------------------------------------------------
# the peers' maps
# ---------------------------------------------------------------------------
def _onehot(logits, target: int):
    import torch

    g = torch.zeros_like(logits)
    g[:, target] = 1.0
    return g


def torchray_eb(peer: TorchPeer, x, target: int, layer: str, contrastive: bool = False) -> np.ndarray:
    """TorchRay's (contrastive) excitation backprop map at ``layer``: (N, h, w), the channel
    sum of P (clipped at 0 for the contrastive one)."""
    from torchray.attribution.excitation_backprop import contrastive_excitation_backprop, excitation_backprop

    name = peer.module_for(layer)
    peer.set_sum_mode("torchray")
    try:
        if contrastive:
            if peer.classifier is None or peer.contrast is None:
                raise ExciteError("TorchRay's contrastive EB needs a linear classifier fed by a node of the model")
            s = contrastive_excitation_backprop(peer.module, x.detach(), target, saliency_layer=name,
                                                contrast_layer=peer.contrast, classifier_layer=peer.classifier)
        else:
            s = excitation_backprop(peer.module, x.detach(), target, saliency_layer=name)
    finally:
        peer.set_sum_mode("plain")
    return s[:, 0].detach().numpy()


class ZennitEB:
    """zennit's ``ExcitationBackprop`` composite (bias kept out of Z) registered on the
    peer's module while the context is open; :meth:`__call__` gives the map at ``layer``."""

    def __init__(self, peer: TorchPeer, layer: str, stabilizer: float = 1e-6):
        from zennit.composites import ExcitationBackprop

        self.peer, self.layer = peer, peer.module_for(layer)
        self.composite = ExcitationBackprop(stabilizer=stabilizer, zero_params=["bias"])
        self._ctx = None
        self._handle = None
        self._leaf = None

    def __enter__(self):
        self.peer.set_sum_mode("zennit")
        self._ctx = self.composite.context(self.peer.module)
        self._ctx.__enter__()
        def cut(module, inputs, output):   # registered after zennit's hooks: the tensor the layers above read
            self._leaf = output.detach().requires_grad_()
            return self._leaf

        self._handle = self.peer.module.get_submodule(self.layer).register_forward_hook(cut)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
        self._ctx.__exit__(*exc)
        self.peer.set_sum_mode("plain")
        self._leaf = None
        return False

    def __call__(self, x, target: int) -> np.ndarray:
        import torch

        out = self.peer.module(x.detach())
        (grad,) = torch.autograd.grad(out, self._leaf, _onehot(out, target))
        return grad.sum(1).detach().numpy()


def zennit_eb(peer: TorchPeer, x, target: int, layer: str, stabilizer: float = 1e-6) -> np.ndarray:
    """zennit's excitation backprop map at ``layer`` (N, h, w), hooks registered for this one call."""
    with ZennitEB(peer, layer, stabilizer) as z:
        return z(x, target)


def _versions(peers: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ["torch", "onnx2torch"] + list(dict.fromkeys(peers)):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "?"
    return out


def run_peers(forward, layer: str, batch_input: np.ndarray, peers: Sequence[str], runs: int = 10, warmup: int = 2,
              threads: int | None = None, target: int = 0,
              progress: Callable[[str, int, int], None] | None = None) -> PeerReport:
    """Median ms of the torch forward alone and of each peer's excitation backprop at
    ``layer`` on ``batch_input`` (the benchmark's own input) for class ``target``; each
    ratio is to the torch forward. The variants run interleaved round by round.
    ``threads``: ``torch.set_num_threads`` for the run (restored afterwards)."""
    import torch

    require(peers)
    progress = progress or (lambda phase, done, total: None)
    progress("torch peers: converting", 0, 1)
    peer = torch_peer(forward)
    peer.module_for(layer)   # a clear error before any timing
    import gc

    gc.collect()   # onnx2torch's intermediate copies of the weights
    x = torch.from_numpy(np.ascontiguousarray(batch_input, dtype=np.float32))
    previous = torch.get_num_threads()
    n_threads = threads or previous
    torch.set_num_threads(n_threads)
    variants: list[tuple[str, str, Callable[[], object], object]] = []

    def forward_only():
        with torch.inference_mode():
            peer.module(x)

    variants.append(("torch", "forward", forward_only, None))
    if "torchray" in peers:
        variants.append(("TorchRay", "excitation backprop", lambda: torchray_eb(peer, x, target, layer), None))
        if peer.classifier is not None and peer.contrast is not None and peer.module_for(layer) != peer.contrast:
            variants.append(("TorchRay", "contrastive EB",
                             lambda: torchray_eb(peer, x, target, layer, contrastive=True), None))
    if "zennit" in peers:
        z = ZennitEB(peer, layer)
        variants.append(("zennit", "ExcitationBackprop composite", lambda: z(x, target), z))
    times: dict[tuple[str, str], list[float]] = {(lib, name): [] for lib, name, *_ in variants}
    try:
        for r in range(warmup + runs):
            if r >= warmup:
                progress("torch peers: timing", r - warmup, runs)
            for lib, name, fn, ctx in variants:
                if ctx is not None:
                    ctx.__enter__()
                try:
                    t0 = time.perf_counter()
                    fn()
                    dt = (time.perf_counter() - t0) * 1e3
                finally:
                    if ctx is not None:
                        ctx.__exit__(None, None, None)
                if r >= warmup:
                    times[(lib, name)].append(dt)
    finally:
        torch.set_num_threads(previous)
    progress("torch peers: timing", runs, runs)
    base = float(np.median(times[("torch", "forward")]))
    rows = [PeerRow(lib, name, float(np.median(t)), float(np.median(t)) / base, float(np.min(t)))
            for (lib, name), t in times.items()]
    notes = [f"same weights: the forward graph converted by onnx2torch; torch threads = {n_threads} "
             f"(= ORT's intra-op threads); forward under torch.inference_mode()"]
    if "torchray" in peers:
        notes.append("TorchRay: paper rule Z = a W+ (+1e-20), ReLU/MaxPool/Clip by their plain gradient, "
                     "residual Adds through its eltwise_sum")
    if "zennit" in peers:
        notes.append("zennit: composites.ExcitationBackprop(zero_params=['bias']) = ZPlus (our positive rule) at "
                     "Conv/Linear, Norm at average pools and residual sums, stabiliser 1e-6; hooks registered once, "
                     "outside the timed call")
    return PeerReport(rows=rows, layer=layer, threads=n_threads, versions=_versions(peers), notes=notes)
