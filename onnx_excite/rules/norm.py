"""LayerNormalization: a linear map per token, excited in O(C) per token.

``y = gamma * (x - mean(x)) / sigma + beta`` over the normalised axes (C values per token).
As in the LN rule of Ali et al. (ICML 2022, used by LXT's AttnLRP / CP-LRP) the standard
deviation ``sigma = sqrt(var(x) + eps)`` is a per-token constant; the centring and gamma are
then the linear map ``y = M x + beta`` with::

    M_ij = (gamma_i / sigma) (delta_ij - 1/C) = (1/sigma) (diag(gamma) - gamma 1^T / C)_ij

and beta is a bias. The excitation rule of the linear layers (``excite_linear``) applies with
contributions ``z_ij = x_j M_ij`` (``paper``: x_j M+_ij; ``positive``: (x_j M_ij)+ =
x+_j M+_ij + x-_j M-_ij, stable where tokens are signed). No C x C matrix is formed: each part
of M is a diagonal plus a constant off the diagonal of each row::

    M^k_ij = (1/sigma) (d^k_i delta_ij + o^k_i (1 - delta_ij)),
    W:  d = gamma (1 - 1/C),    o = -gamma / C
    W+: d = gamma+ (1 - 1/C),   o = -gamma- / C
    W-: d = gamma- (1 - 1/C),   o = -gamma+ / C

(gamma+ = max(gamma, 0), gamma- = min(gamma, 0); sigma > 0 keeps the signs), so that with the
exclusive sums E(v)_i = sum_{j != i} v_j::

    (M^k v)_i   = (d_i v_i + o_i E(v)_i) / sigma
    (M^k' r)_j  = d_j r_j / sigma + E(o r / sigma)_j

For the positive rule Z_i = sum_j z_ij = (d+_i x+_i + o+_i E(x+)_i + d-_i x-_i + o-_i E(x-)_i) / sigma,
the sums of x+ and x- over the other C - 1 entries of the token, and P_in_j = x+_j (M+' R)_j +
x-_j (M-' R)_j, R = P / Z. Every term is a product of one contribution's factors: the exclusive
sums (two exclusive CumSums, forward and reverse) are never a total minus the own entry, so a
row with Z_i = 0 has every z_ij = 0 and passes exactly nothing, as in any linear layer.

The gradient family (grad, deconv, guided: the linear entry ``1 * W``) gets the true
derivative, sigma's dependence on x included: with xh = (x - mean) / sigma and g = gamma P,
``P_in = (g - mean(g) - xh mean(g xh)) / sigma`` (the means over the token's C values).
"""
from __future__ import annotations

import numpy as np

from .base import Context, attr, register
from .linear import excite_linear


def layernorm_check(graph, node):
    rank = graph.rank(node.input[0])
    if rank is None:
        return "input rank unknown"
    if attr(node, "axis", -1) % rank != rank - 1:
        return "normalisation over several axes (only the last axis, as nn.LayerNorm(C) exports it)"
    if graph.static_dims(node.input[0], [rank - 1]) is None:
        return "the normalised axis has a dynamic size (fix the input shape)"
    if any(i not in graph.consts for i in node.input[1:] if i):
        return "gamma or beta is not a constant"
    if any(o for o in node.output[1:]):
        return "the mean / inverse standard deviation outputs are used"
    return None


def layernorm_parts(kind: str, gamma: np.ndarray) -> np.ndarray:
    """(d, o) of the part ``kind`` of sigma M (see the module docstring), stacked (2, C) (float32)."""
    c = gamma.size
    part = {"W": gamma, "W+": np.maximum(gamma, 0), "W-": np.minimum(gamma, 0)}[kind]
    off = {"W": gamma, "W+": np.minimum(gamma, 0), "W-": np.maximum(gamma, 0)}[kind]
    return np.stack([part * (1 - 1 / c), -off / c]).astype(np.float32)


@register("LayerNormalization", inputs=(0,), check=layernorm_check, family="linear", layout="elementwise",
          description="sigma a per-token constant (Ali et al. 2022): the centring and gamma are a linear map "
                      "M = (diag(gamma) - gamma 1'/C) / sigma, beta a bias; excited as a linear layer in O(C) per token "
                      "(positive: (x_j M_ij)+ from the sums of x+ and x-)")
def layer_normalization(ctx: Context, node, p: str, negate=False):
    """The linear rule through y = M x + beta, M = (diag(gamma) - gamma 1^T / C) / sigma."""
    g = ctx.g
    x = node.input[0]
    axis = ctx.graph.rank(x) - 1
    axes = [axis]
    shape = ctx.graph.static_dims(x, axes)
    gamma = np.broadcast_to(ctx.graph.consts[node.input[1]].astype(np.float64).reshape(-1), shape)
    beta = None
    if len(node.input) > 2 and node.input[2]:
        beta = np.broadcast_to(ctx.graph.consts[node.input[2]].astype(np.float64).reshape(-1), shape)

    def inverse_sigma():
        a = ctx.act(x)
        centred = g.sub(a, g.reduce("ReduceMean", a, axes, keepdims=1, hint="ln_mean"))
        var = g.reduce("ReduceMean", g.mul(centred, centred), axes, keepdims=1, hint="ln_var")
        eps = g.scalar(float(attr(node, "epsilon", 1e-5)))
        return g.op("Reciprocal", [g.op("Sqrt", [g.add(var, eps)])], hint="ln_inv_sigma")

    inv = g.memo((node.name, "ln_inv_sigma"), inverse_sigma)
    if any(act == "1" for act, _ in ctx.variant("linear").resolve(ctx.rule)):
        return {x: _gradient(ctx, node, x, p, gamma, inv, axes, negate)}

    def others(t):
        """E(t)_i = sum_{j != i} t_j over the last axis, with no cancellation."""
        ax = g.i64(axis)
        return g.add(g.op("CumSum", [t, ax], exclusive=1, hint="ln_before"),
                     g.op("CumSum", [t, ax], exclusive=1, reverse=1, hint="ln_after"))

    def apply(v, wk, adjoint):
        d, o = g.const(wk[0], "ln_d"), g.const(wk[1], "ln_o")
        if adjoint:   # M' r = d r / sigma + E(o r / sigma)
            v = g.mul(v, inv)
            return g.add(g.mul(v, d), others(g.mul(v, o)))
        return g.mul(g.add(g.mul(v, d), g.mul(others(v), o)), inv)

    out = excite_linear(ctx, node, x, p, gamma, forward=lambda v, wk: apply(v, wk, False),
                        transpose=lambda r, wk: apply(r, wk, True), negate=negate, bias=beta,
                        part_of=layernorm_parts)
    return {x: out}


def _gradient(ctx: Context, node, x: str, p: str, gamma: np.ndarray, inv: str, axes: list, negate: bool) -> str:
    """The transposed Jacobian of layer normalisation applied to P (see the module docstring)."""
    g = ctx.g
    a = ctx.act(x)
    xh = g.mul(g.sub(a, g.reduce("ReduceMean", a, axes, keepdims=1, hint="ln_mean")), inv)
    gp = g.mul(p, g.const((-gamma if negate else gamma).astype(np.float32), "ln_gamma"))
    mean_g = g.reduce("ReduceMean", gp, axes, keepdims=1, hint="ln_grad_mean")
    mean_gx = g.reduce("ReduceMean", g.mul(gp, xh), axes, keepdims=1, hint="ln_grad_xmean")
    return g.mul(g.sub(g.sub(gp, mean_g), g.mul(xh, mean_gx)), inv)
