"""The op registry: one declaration per op (``OPS``), the excitation rules among them (``RULES``), one module per op family.

Every module of this package is imported here (discovered with pkgutil, not
listed): a new rule module registers its ops by existing.
"""
import importlib
import pkgutil

from .base import (OPS, RULE_CHOICES, RULES, Context, Rule, data_inputs, declare, declared, has_role, ops_with, proves_nonneg,
                   register, unsupported_reason)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_") and _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["OPS", "RULES", "RULE_CHOICES", "Context", "Rule", "data_inputs", "declare", "declared", "has_role", "ops_with",
           "proves_nonneg", "register",
           "unsupported_reason"]
