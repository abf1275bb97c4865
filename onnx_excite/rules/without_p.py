"""Ops that carry no P, declared for what the rest of the tool reads about them.

The builder refuses them on the signal's path (they have no excitation rule); their
declarations say what they do to the layout, whether their output is provably >= 0 (a
Exp normaliser), and their roles (a LogSoftmax below the logits is a squasher;
ConvTranspose is a multiply-accumulate layer of the companion graph).
"""
from .base import declare

declare("LogSoftmax", roles={"squasher"})
declare("Exp", "Abs", keeps_nonneg="always", layout="elementwise")
declare("Neg", "Sqrt", "Min", "Where", layout="elementwise")
declare("ConvTranspose", layout="nchw", roles={"mac"})
declare("LpPool", "GlobalLpPool", "InstanceNormalization", layout="nchw")
