"""Excitation rules, one module per op family, registered by op_type in ``RULES``."""
from .base import RULE_CHOICES, RULES, Context, Rule, data_inputs, register, unsupported_reason
from . import linear, merge, passthrough, pooling  # noqa: F401  (registration side effects)
from . import einsum, elementwise, global_max, resize, shape  # noqa: F401

__all__ = ["RULES", "RULE_CHOICES", "Context", "Rule", "data_inputs", "register", "unsupported_reason"]
