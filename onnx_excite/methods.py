"""Attention methods as data: each method is one ``Method`` declaration in ``METHODS``.

A method states how the top-down signal P passes each op family of the companion graph
(zennit-style: a rule is a small declaration), what its dual is, how P becomes a map and what
mass to expect. All methods run over the same backward sweep; only these choices differ.

Notation (a = a layer's input activation, W its weight, b its bias, e the signal (N, K) at
the logits s, adj = transpose of the bias-free layer, e.g. ConvTranspose for Conv):

* ``RuleVariant(parts, normalise, bias)`` for the weighted families. ``parts`` are
  (activation factor, weight) pairs, the factor one of ``1``, ``a``, ``a+``, ``a-`` and the
  weight one of ``W``, ``W+``, ``W-``; ``parts=None`` takes the parts of the excitation rule
  chosen by ``--rule`` (``RULE_PARTS``); weight ``1`` is a unit weight (a pool's window
  sum without its 1/count). The rule computes
      Z = sum_parts fwd(act, weight) (+ b when bias == "in-Z"),
      R = P / Z ("Z"), P / (Z + eps * max|Z| * sign Z) ("Z+eps", eps = 1e-6, max over the
          node's outputs of the same sample, sign(0) = +1) or P ("none"),
      P_in = sum_parts act * adj(R, weight),  a term with a zero denominator gives 0.
  ``linear`` is the rule of Conv/Gemm/MatMul (and of an unfolded BatchNormalization: weight
  s = gamma / sqrt(var + eps), bias beta - mean s); ``pool`` of AveragePool,
  GlobalAveragePool and a spatial ReduceMean (weights 1/count); ``add`` of an Add of data tensors (weights 1). A constant addend is a
  bias: with ``bias="ignored"`` an Add of one data tensor and a constant passes P unchanged,
  with ``"in-Z"`` the constant joins Z (and takes its share of P, which is dropped).
* ``relu``: the gate at a rectifier (Relu; Clip/ReLU6 with the mask [lo < x < hi]):
  ``forward-mask`` (P * [x > 0], the gradient), ``backward-relu`` (max(P, 0), deconvnet),
  ``both`` (guided backprop) or ``none``.
* ``activation``: smooth activations (Sigmoid, Tanh, HardSwish, LRN ...) ``pass`` P or apply
  their declared ``derivative`` (grad, guided).
* ``arithmetic``: Mul by a gate, Sub and Div by a constant, Mean: ``excitation`` (a gate or a
  constant is a per-element scale, P goes to the features) or ``chain-rule`` (the gradient:
  the product rule at Mul, -P for ``c - x``, P / c, P / n).

A method is a map from op family to its entry: :meth:`Method.variant` returns the entry of
a family (``linear``, ``pool``, ``add``, ``rectifier``, ``activation``, ``arithmetic``);
each op declares its family (:mod:`onnx_excite.rules`), and a rule asks for that entry,
never for the method.
  MaxPool routes P to the first maximum of each window in every method; reshapes, Concat,
  Identity/Dropout move P unchanged.
* ``top``: the signal entering at the logits: ``signal`` (e) or ``score`` (e * s, LRP).
* ``dual``: ``none``; ``difference`` (at the classifier - the first weighted node below
  the logits - P_in = rule(W) - rule(-W), propagated: c-MWP); ``separate`` (a second sweep
  from the negated classifier; both maps L1-normalised per sample, subtracted).
* ``reduce``: ``sum`` or ``abs-max`` over channels, or a class activation map that also reads
  the layer's forward activation A (positions: the axes other than batch and channels; a token
  layer's patch tokens): ``grad-cam`` (Selvaraju et al. 2017: weights alpha_c = the mean of P_c
  over the positions, map sum_c alpha_c A_c) or ``grad-cam++`` (Chattopadhyay et al. 2018, the
  exponential-score closed form: alpha = P^2 / (2 P^2 + S_c P^3), S_c = sum of A_c over the
  positions, 0 where the denominator is 0; weights w_c = sum over the positions of
  alpha ReLU(P_c), map sum_c w_c A_c); ``clip``: max(map, 0) after it (and after the dual's
  subtraction).
* ``mass``: what sum(P) over a layer should be, for diagnostics: ``signal`` (sum e, less
  the share of units with Z = 0), ``score`` (sum e * s for bias-free nets), ``zero``
  (the target and dual carry equal mass: sum P ~ 0), or ``none``.
* ``blur``: the paper's Gaussian blur (sigma = 0.02 max(W, H), ``onnx_excite.render.postprocess``)
  before display/evaluation: grad, deconv, guided, LRP (the paper) and c-grad, c-deconv
  (our choice: pixel-level maps like their base methods); every map is upsampled bicubically.
* ``layers``: ``any``, ``last-feature-map`` (CAM: the input of the global pool feeding
  the linear classifier), ``attention-tokens`` (rollout: the tokens the first self-attention
  block reads) or ``feature-maps`` (Grad-CAM: any layer with positions, i.e. of
  rank >= 3, but the model's input: a class activation map weights feature channels, and
  the colour channels of the image are none).
* ``kind``: ``sweep`` (the backward sweep above, every method but one) or ``rollout``
  (attention rollout, Abnar & Zuidema 2020: a product of the forward attention weights, no
  signal and no sweep; its rule entries are None)::

      A_l = mean over heads of Softmax(..) of block l,  (N, T, T)
      B_l = (A_l + I) / 2, rows renormalised,   R = B_L ... B_2 B_1
      map = R[class token, patch tokens] on the patch grid (class-agnostic: the signal is ignored)
* ``quantity``: what the map's values are, in words (colour bars): MWP a winning probability,
  grad |gradient|, LRP relevance, CAM class activation.
* ``contrastive_variant``: the registered method that is this one with a dual (mwp -> cmwp,
  grad -> c-grad, deconv -> c-deconv, cam -> c-cam): what ``--contrastive`` adds.

The float64 reference of every method is ``tests/method_ref.py``; how the companion-graph
builder consumes these declarations is in docs/methods.md. ``BLACK_BOX`` lists the methods that
need no companion graph (RISE, :mod:`onnx_excite.apps.rise`), ``BASELINES`` the maps that need
no model (eval's center baseline).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from .errors import ExciteError

Parts = Tuple[Tuple[str, str], ...]

ACTIVATION_FACTORS = ("1", "a", "a+", "a-")
WEIGHTS = ("W", "W+", "W-", "1")
NORMALISATIONS = ("none", "Z", "Z+eps")
BIASES = ("ignored", "in-Z")
GATES = ("forward-mask", "backward-relu", "both", "none")
ACTIVATIONS = ("pass", "derivative")
ARITHMETIC = ("excitation", "chain-rule")
TOPS = ("signal", "score")
DUALS = ("none", "difference", "separate")
REDUCTIONS = ("sum", "abs-max", "grad-cam", "grad-cam++")
#: the reductions that weight the layer's forward activation (class activation maps)
CAM_REDUCTIONS = ("grad-cam", "grad-cam++")
MASSES = ("signal", "score", "zero", "none")
LAYERS = ("any", "last-feature-map", "attention-tokens", "feature-maps")
KINDS = ("sweep", "rollout")

LRP_EPSILON = 1e-6  # relative: eps_i = 1e-6 * max |z| over the node's outputs of the sample

#: the excitation rules of ``--rule``: the one table of them (``rules.RULE_CHOICES`` is its keys)
RULE_PARTS = {
    "positive": (("a+", "W+"), ("a-", "W-")),   # z_ij = (a_j W_ij)+
    "paper": (("a", "W+"),),                    # z_ij = a_j W+_ij
}


@dataclass(frozen=True)
class RuleVariant:
    """P_in = sum over ``parts`` of act * adj(R, weight), R = P normalised per ``normalise``."""

    parts: Optional[Parts]          # None: the parts of the --rule excitation rule
    normalise: str = "Z"
    bias: str = "ignored"

    def __post_init__(self):
        for act, weight in self.parts or ():
            if act not in ACTIVATION_FACTORS or weight not in WEIGHTS:
                raise ValueError(f"bad part ({act!r}, {weight!r})")
        if self.normalise not in NORMALISATIONS or self.bias not in BIASES:
            raise ValueError(f"bad rule variant {self}")

    def resolve(self, rule: str = "positive") -> Parts:
        """The (activation, weight) parts, those of ``rule`` where the variant defers to it."""
        if self.parts is not None:
            return self.parts
        if rule not in RULE_PARTS:
            raise ExciteError(f"unknown rule {rule!r}; choose from {', '.join(RULE_PARTS)}")
        return RULE_PARTS[rule]

    def describe(self, rule: Optional[str] = None) -> str:
        parts = self.parts if self.parts is not None or rule is None else self.resolve(rule)
        text = "rule" if parts is None else " + ".join(w if a == "1" else f"{a} {w}" for a, w in parts)
        if self.normalise != "none":
            text += f" /{self.normalise}"
        if self.bias == "in-Z":
            text += " (bias in Z)"
        return text


GRADIENT = RuleVariant((("1", "W"),), normalise="none")         # adj(P, W): the transposed layer
EXCITATION = RuleVariant(None, normalise="Z")                   # MWP: the --rule parts, / Z
EXCITATION_UNNORMALISED = RuleVariant(None, normalise="none")
ZPLUS = RuleVariant(RULE_PARTS["positive"], normalise="Z")      # alpha1-beta0 (bias ignored)
EPSILON = RuleVariant((("a", "W"),), normalise="Z+eps", bias="in-Z")
CAM_POOL = RuleVariant((("a", "1"),), normalise="none")          # CAM's global pool: P_in = a * P


@dataclass(frozen=True)
class Method:
    """One attention method (see the module docstring for every field's meaning)."""

    name: str
    description: str
    linear: Optional[RuleVariant]   # None only for a method that runs no sweep (``kind`` rollout)
    pool: Optional[RuleVariant]
    add: Optional[RuleVariant]
    relu: str
    activation: str = "pass"
    arithmetic: str = "excitation"
    display: str = ""               # the name in captions and tables (default: ``name``)
    top: str = "signal"
    dual: str = "none"
    reduce: str = "sum"
    clip: bool = False
    mass: str = "signal"
    blur: bool = False
    layers: str = "any"
    kind: str = "sweep"
    contrastive_variant: str = ""   # the method that adds a dual to this one (``--contrastive``), if any
    quantity: str = ""              # what a map's values are, for colour bars ("winning probability", ...)

    def __post_init__(self):
        if not self.quantity:
            raise ValueError(f"method {self.name!r}: declare the quantity its maps hold")
        for value, allowed in ((self.relu, GATES), (self.activation, ACTIVATIONS), (self.arithmetic, ARITHMETIC),
                               (self.top, TOPS), (self.dual, DUALS),
                               (self.reduce, REDUCTIONS), (self.mass, MASSES), (self.layers, LAYERS),
                               (self.kind, KINDS)):
            if value not in allowed:
                raise ValueError(f"method {self.name!r}: {value!r} is not one of {allowed}")
        variants = (self.linear, self.pool, self.add)
        if self.kind == "sweep" and not all(isinstance(v, RuleVariant) for v in variants):
            raise ValueError(f"method {self.name!r}: a sweep needs a RuleVariant for linear, pool and add")
        if self.kind != "sweep" and (any(v is not None for v in variants) or self.dual != "none"
                                     or self.mass != "none" or self.clip):
            raise ValueError(f"method {self.name!r}: a {self.kind} method has no rule variants, dual, mass or clip")

    @property
    def label(self) -> str:
        return self.display or self.name

    def variant(self, family: str):
        """The entry of the method's map for an op family (see the module docstring)."""
        entries = {"linear": self.linear, "pool": self.pool, "add": self.add, "rectifier": self.relu,
                   "activation": self.activation, "arithmetic": self.arithmetic}
        if family not in entries:
            raise ValueError(f"no method entry for op family {family!r}")
        return entries[family]

    @property
    def sweep_key(self) -> tuple:
        """Methods with equal keys have the same target sweep (they differ only after it)."""
        return (self.linear, self.pool, self.add, self.relu, self.activation, self.arithmetic, self.top)

    @property
    def contrastive(self) -> bool:
        return self.dual != "none"

    @property
    def sweeps(self) -> bool:
        """Whether the method's map comes from the backward sweep (all but rollout)."""
        return self.kind == "sweep"


_SUM_RULES = dict(pool=EXCITATION, add=EXCITATION)


def _grad_cam(name, reduce, description, display):
    """Grad-CAM and Grad-CAM++: grad's sweep (the true gradient of e . s; it is shared with grad
    in one build), reduced with the layer's activation, clipped (the ReLU of the map)."""
    return replace(_gradient_family(name, "forward-mask", description, "gradient-weighted class activation"),
                   display=display, reduce=reduce, clip=True, blur=False, layers="feature-maps")


def _gradient_family(name, relu, description, quantity, dual="none", contrastive_variant=""):
    """grad, deconv, guided and their contrastive variants: pixel-level maps, all blurred
    (the paper blurs grad/deconv/guided; their contrastive maps are as noisy). Smooth
    activations apply their derivative where the gate includes the forward mask."""
    activation = "derivative" if relu in ("forward-mask", "both") else "pass"
    return Method(name, description, linear=GRADIENT, pool=GRADIENT, add=GRADIENT, relu=relu, activation=activation,
                  arithmetic="chain-rule", dual=dual, reduce="abs-max", clip=dual != "none",
                  mass="none" if dual == "none" else "zero", blur=True, contrastive_variant=contrastive_variant,
                  quantity=("contrastive " if dual != "none" else "") + quantity)


METHODS: dict = {m.name: m for m in (
    Method("mwp", "Marginal Winning Probability (Excitation Backprop)", linear=EXCITATION, relu="none",
           display="MWP", contrastive_variant="cmwp", quantity="winning probability", **_SUM_RULES),
    Method("cmwp", "contrastive MWP: target minus negated classifier at its input, propagated",
           linear=EXCITATION, relu="none", display="c-MWP", dual="difference", clip=True, mass="zero",
           quantity="contrastive winning probability", **_SUM_RULES),
    _gradient_family("grad", "forward-mask",
                     "gradient of the target score; max |g| over channels", "|gradient|",
                     contrastive_variant="c-grad"),
    _gradient_family("deconv", "backward-relu",
                     "deconvnet (Zeiler-Fergus): ReLU on the backward signal, no forward mask",
                     "|deconvnet signal|", contrastive_variant="c-deconv"),
    _gradient_family("guided", "both", "guided backprop: forward ReLU mask and backward ReLU",
                     "|guided gradient|"),
    Method("lrp-epsilon", "LRP-epsilon (eps = 1e-6 relative to max|z| of the layer, bias in z)",
           linear=EPSILON, pool=RuleVariant((("a", "W"),), normalise="Z+eps"), add=EPSILON, relu="none",
           top="score", mass="score", blur=True, quantity="relevance"),
    Method("lrp-zplus", "LRP alpha1-beta0 (z+ rule, bias ignored)", linear=ZPLUS, pool=ZPLUS, add=ZPLUS,
           relu="none", top="score", mass="score", blur=True, quantity="relevance"),
    Method("cam", "class activation map: class weights times the last feature map (GAP + linear heads)",
           linear=GRADIENT, pool=CAM_POOL, add=GRADIENT, relu="none", arithmetic="chain-rule",
           mass="none", layers="last-feature-map", contrastive_variant="c-cam", quantity="class activation"),
    _gradient_family("c-grad", "forward-mask",
                     "contrastive gradient: L1-normalised map minus dual map (all zeros, as the paper notes)",
                     "|gradient|", dual="separate"),
    _gradient_family("c-deconv", "backward-relu",
                     "contrastive deconvnet: L1-normalised map minus dual map, clipped", "|deconvnet signal|",
                     dual="separate"),
    Method("c-cam", "contrastive CAM: L1-normalised CAM minus the negated classifier's, clipped",
           linear=GRADIENT, pool=CAM_POOL, add=GRADIENT, relu="none", arithmetic="chain-rule", dual="separate", clip=True,
           mass="none", layers="last-feature-map", quantity="contrastive class activation"),
    _grad_cam("gradcam", "grad-cam", "Grad-CAM: ReLU of the layer's channels weighted by their mean gradient",
              display="Grad-CAM"),
    _grad_cam("gradcam++", "grad-cam++",
              "Grad-CAM++: ReLU of the layer's channels weighted by their positive gradients (closed form)",
              display="Grad-CAM++"),
    Method("cmwp-nonorm", "ablation: c-MWP without Z normalisation at weighted layers",
           linear=EXCITATION_UNNORMALISED, relu="none", dual="difference", clip=True, mass="none",
           quantity="contrastive excitation (unnormalised)", **_SUM_RULES),
    Method("cmwp-postnorm", "ablation: MWP and dual MWP computed separately, each L1-normalised, subtracted",
           linear=EXCITATION, relu="none", dual="separate", clip=True, mass="zero",
           quantity="contrastive winning probability (L1-normalised)", **_SUM_RULES),
    Method("rollout", "attention rollout (Abnar & Zuidema 2020): class token's row of the product over the blocks "
           "of head-averaged attention + I; class-agnostic (ignores the target); ViT, DeiT", linear=None, pool=None, add=None, relu="none", mass="none",
           layers="attention-tokens", kind="rollout",
           quantity="attention flow from the class token"),
)}


#: the methods a command runs when none is named
DEFAULT_METHODS = ("mwp", "cmwp")


def with_contrastive(names) -> tuple:
    """``names`` and, after them, each one's contrastive variant (``--contrastive``); a method
    that has none and is not contrastive itself is an ExciteError."""
    chosen = list(names)
    for name in list(chosen):
        method = get_method(name)
        if method.contrastive:
            continue
        if not method.contrastive_variant:
            pairs = ", ".join(f"{m.name} -> {m.contrastive_variant}" for m in METHODS.values() if m.contrastive_variant)
            raise ExciteError(f"--contrastive: {name} has no contrastive variant (those that have one: {pairs})")
        if method.contrastive_variant not in chosen:
            chosen.append(method.contrastive_variant)
    return tuple(chosen)


def method_names() -> tuple:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``; ExciteError naming the choices otherwise."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(str(name), METHODS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ExciteError(f"unknown method {name!r}{hint}; choose from {', '.join(METHODS)}")


def method_table(rule: str = "positive") -> list:
    """One dict of display strings per method (for `onnx-excite methods`): the graph methods,
    then the black-box ones (``kind``)."""
    if rule not in RULE_PARTS:
        raise ExciteError(f"unknown rule {rule!r}; choose from {', '.join(RULE_PARTS)}")
    rows = []
    for m in METHODS.values():
        if m.sweeps:
            final = {"abs-max": "max|P|", "sum": "sum", "grad-cam": "sum mean(P) A",
                     "grad-cam++": "sum w(P, A) A"}[m.reduce] + (", clip" if m.clip else "")
            parts = {k: getattr(m, k).describe(rule) for k in ("linear", "pool", "add")}
            relu, top = m.relu, m.top
        else:   # no sweep: no rule per op family, no top signal
            final, parts, relu, top = "class-token row", dict.fromkeys(("linear", "pool", "add"), "-"), "-", "-"
        rows.append({"method": m.name, "dual": m.dual, "map": final, "blur": "yes" if m.blur else "no",
                     **parts, "relu": relu, "top": top, "mass": m.mass, "layers": m.layers,
                     "values": m.quantity, "contrastive": m.contrastive_variant or "-",
                     "kind": "graph", "description": m.description})
    for b in BLACK_BOX.values():
        rows.append({"method": b.name, "dual": "-", "map": b.map, "blur": "yes" if b.blur else "no",
                     "linear": "-", "pool": "-", "add": "-", "relu": "-", "top": "softmax probability", "mass": "-",
                     "layers": "model input", "values": b.quantity, "contrastive": "-", "kind": "black box",
                     "description": b.description})
    return rows


@dataclass(frozen=True)
class Baseline:
    """A map that needs no model (scored beside the methods by ``eval``)."""

    name: str
    description: str


#: baselines ``eval`` scores beside the methods
BASELINES: dict = {b.name: b for b in (
    Baseline("center", "no model: the image centre (pointing), a cone falling from the centre to the corners (localization)"),
)}


@dataclass(frozen=True)
class BlackBox:
    """A method that needs no companion graph: it runs the plain forward model on perturbed
    copies of the input (RISE: :mod:`onnx_excite.apps.rise`). Its map is at the resolution of
    the model input; ``explain`` and ``eval`` run it beside the methods of ``METHODS``."""

    name: str
    description: str
    display: str = ""
    map: str = ""           # how the map is formed, for `onnx-excite methods`
    blur: bool = False      # no Gaussian blur: the map is smooth already
    quantity: str = "saliency"   # what a map's values are, for colour bars

    @property
    def label(self) -> str:
        return self.display or self.name


#: black-box methods (no companion graph)
BLACK_BOX: dict = {b.name: b for b in (
    BlackBox("rise", "RISE (Petsiuk et al. 2018): random smooth masks weighted by the target's softmax probability "
                     "(black box: masked forwards, no companion graph)",
             display="RISE", map="sum p(x*M) M / (N p)"),
)}


def is_black_box(name: str) -> bool:
    return name in BLACK_BOX


def get_any_method(name: str):
    """The registered method or black-box method ``name`` (``label`` and ``blur`` are common
    to both); ExciteError naming the choices otherwise."""
    if name in BLACK_BOX:
        return BLACK_BOX[name]
    if name in METHODS:
        return METHODS[name]
    known = list(METHODS) + list(BLACK_BOX)
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ExciteError(f"unknown method {name!r}{hint}; choose from {', '.join(known)}")


def method_help(baselines: bool = False) -> str:
    """The method names a command accepts, for help texts (black-box methods included)."""
    names = list(METHODS) + list(BLACK_BOX) + (list(BASELINES) if baselines else [])
    return ", ".join(names)
